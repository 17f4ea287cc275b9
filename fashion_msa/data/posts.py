"""Post records, skip reasons and the checks shared by every importer."""

import dataclasses
import enum
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
SPLITS: tuple[str, ...] = ("train", "val", "test")


class SkipReason(enum.StrEnum):
    """Reason a post was left out of a build, as build reports show it."""

    MALFORMED_RECORD = "malformed_record"
    MISSING_FIELD = "missing_field"
    INVALID_ID = "invalid_id"
    UNKNOWN_LABEL = "unknown_label"
    MISSING_LABEL = "missing_label"
    UNKNOWN_SPLIT = "unknown_split"
    NO_SPLIT = "no_split"
    PATH_OUTSIDE_INPUT = "path_outside_input"
    MISSING_IMAGE = "missing_image"
    EMPTY_IMAGE = "empty_image"
    UNREADABLE_IMAGE = "unreadable_image"
    IMAGE_TOO_LARGE = "image_too_large"
    MISSING_TEXT = "missing_text"
    UNDECODABLE_TEXT = "undecodable_text"
    CONFLICTING_ATTRIBUTES = "conflicting_attributes"


class DropReason(enum.StrEnum):
    """Reason a source's own rules exclude a valid post (not an input error)."""

    LABEL_CONFLICT = "label_conflict"


@dataclasses.dataclass(frozen=True)
class Post:
    """One fashion post as an importer read it, before its image is checked.

    Attributes:
      id: unique within the source; safe to use as a file name.
      text: the post text.
      attributes: "name: value; name: value", or "" when the source has none.
      image_path: absolute path of the image file, inside the input folder.
      label: one of `LABELS`.
      split: one of `SPLITS`.
      metadata: source-specific strings (MVSA: `text_label`, `image_label`).
    """

    id: str
    text: str
    attributes: str
    image_path: pathlib.Path
    label: str
    split: str
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Skip:
    """A post left out of a build, with the reason and a human-readable detail."""

    id: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.id}: {self.reason}" + (
            f" ({self.detail})" if self.detail else ""
        )

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ImportResult:
    """What an importer returns.

    Attributes:
      posts: the posts to build, in source order.
      skipped: posts rejected as bad input (each one fails a strict build).
      counts: source-specific tallies, e.g. `conflicts` or `gb18030_texts`.
      dropped: valid posts that the source's own rules exclude, such as MVSA
        posts whose text and image labels conflict. They never fail a build.
    """

    posts: list[Post]
    skipped: list[Skip]
    counts: dict[str, int]
    dropped: list[Skip] = dataclasses.field(default_factory=list)


class DuplicateIdError(ValueError):
    """Raised when two posts of one source share an id; the build stops."""


class PathOutsideInputError(ValueError):
    """Raised by `resolve_inside` for a path that leaves the input folder."""


def check_unique_ids(ids: Iterable[str], source: str) -> None:
    """Raise `DuplicateIdError` listing every id that occurs more than once."""
    seen: dict[str, int] = {}
    for post_id in ids:
        seen[post_id] = seen.get(post_id, 0) + 1
    duplicates = sorted(post_id for post_id, count in seen.items() if count > 1)
    if duplicates:
        shown = ", ".join(repr(post_id) for post_id in duplicates[:20])
        more = f" and {len(duplicates) - 20} more" if len(duplicates) > 20 else ""
        raise DuplicateIdError(
            f"{source}: {len(duplicates)} post ids occur more than once: "
            f"{shown}{more}. Ids must be unique; fix the input and rebuild."
        )


def validate_id(raw: Any) -> str:
    """Return `raw` as an id string, or raise ValueError when it cannot name a file.

    Pseudo images are stored as `images/{id}.png`, so an id must be a single
    non-empty path component without control characters.
    """
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise ValueError(f"id must be a string or an integer, got {type(raw).__name__}")
    post_id = str(raw).strip()
    if not post_id:
        raise ValueError("id is empty")
    if post_id in (".", "..") or "/" in post_id or "\\" in post_id:
        raise ValueError(f"id {post_id!r} contains a path separator or is . or ..")
    if any(ord(char) < 32 for char in post_id):
        raise ValueError(f"id {post_id!r} contains a control character")
    return post_id


def parse_label(raw: Any, label_names: Sequence[str] | None = None) -> str:
    """Return the label name for `raw`, or raise ValueError.

    Strings match `LABELS` case-insensitively. Integers are accepted only with
    `label_names`, the source's own order of class names, because sources
    disagree on which integer means which class.
    """
    if isinstance(raw, str):
        label = raw.strip().lower()
        if label in LABELS:
            return label
        raise ValueError(f"label {raw!r} is not one of {', '.join(LABELS)}")
    if isinstance(raw, int) and not isinstance(raw, bool):
        if label_names is None:
            raise ValueError(
                f"integer label {raw} needs label_names, the class name of each "
                "integer in this source"
            )
        if not 0 <= raw < len(label_names):
            raise ValueError(
                f"integer label {raw} is outside 0..{len(label_names) - 1}"
            )
        return parse_label(label_names[raw])
    raise ValueError(f"label {raw!r} is neither a string nor an integer")


def format_attributes(raw: Any) -> str:
    """Return attributes as "name: value; name: value" (input order kept).

    Accepts that string itself, a mapping from name to a value or a list of
    values (joined with ", "), a list of "name: value" strings, or a list of
    (name, value) pairs. None gives "". Raises ValueError for anything else.
    """
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw.strip()
    if isinstance(raw, Mapping):
        pairs: Iterable[Any] = raw.items()
    elif isinstance(raw, list | tuple):
        pairs = raw
    else:
        raise ValueError(f"attributes of type {type(raw).__name__} are not supported")

    parts = []
    for pair in pairs:
        if isinstance(pair, str):
            parts.append(pair.strip())
            continue
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise ValueError(f"attribute entry {pair!r} is not a (name, value) pair")
        name, value = pair
        if isinstance(value, list | tuple | set | frozenset):
            value = ", ".join(str(item) for item in value)
        parts.append(f"{str(name).strip()}: {str(value).strip()}")
    return "; ".join(part for part in parts if part)


def resolve_inside(
    root: pathlib.Path, relative: str | pathlib.PurePath
) -> pathlib.Path:
    """Return the real path of `relative` under `root`.

    Raises:
      PathOutsideInputError: `relative` is absolute, or it leaves `root` through
        `..` or a symbolic link.
    """
    candidate = pathlib.PurePath(relative)
    if candidate.is_absolute():
        raise PathOutsideInputError(
            f"absolute path {str(relative)!r} is not allowed; give paths relative "
            f"to {root}"
        )
    real_root = root.resolve()
    resolved = (real_root / candidate).resolve()
    if not resolved.is_relative_to(real_root):
        raise PathOutsideInputError(
            f"path {str(relative)!r} resolves to {resolved}, outside {real_root}"
        )
    return resolved


def check_image_path(
    root: pathlib.Path, relative: str | pathlib.PurePath, post_id: str
) -> pathlib.Path | Skip:
    """Return the image path under `root`, or a `Skip` when it is unusable.

    Only the location is checked here; the builder decodes the image.
    """
    try:
        path = resolve_inside(root, relative)
    except PathOutsideInputError as error:
        return Skip(post_id, SkipReason.PATH_OUTSIDE_INPUT, str(error))
    if not path.is_file():
        return Skip(post_id, SkipReason.MISSING_IMAGE, f"{relative} not found")
    return path
