"""Importer for the FashionSenti release layout (Yuan and Lam, 2022).

NOTE: the release itself was not available while this importer was written,
so the layout below is an assumption built around the release's file names.
A copy with a different structure can be rearranged into this layout or
converted to a manifest.

  final_dict_train.pkl    one pickle per split (train, val, test; at least one
  final_dict_val.pkl      must exist). Each contains a dict from post id (str or
  final_dict_test.pkl     int) to a record dict, or a list of record dicts
                          that each carry an "id" key.
  attribute_dict*.pkl     optional, any number: dicts from post id to that
                          post's attributes. The same id in two files must
                          have the same attributes.
  images/                 the post images.

A record dict has:

  text        str, required.
  label       required: "negative", "neutral" or "positive" (any case), or an
              integer when `label_names` gives the class of each integer.
  image       optional path relative to the input folder. Without it the
              image is images/{id}.jpg, .jpeg, .png or .webp, the first that
              exists.
  attributes  optional, in any form of the attribute files.
  any other   scalar values become metadata strings.

Attributes are "name: value; name: value", a dict from name to value (or to
a list of values), a list of "name: value" strings, or a list of pairs.

All pickles are untrusted: they load through `safe_pickle.load_untrusted`,
which rejects anything but plain containers and scalars.
"""

import pathlib
from collections.abc import Sequence
from typing import Any

from fashion_msa.data.posts import (
    SPLITS,
    ImportResult,
    Post,
    Skip,
    SkipReason,
    check_image_path,
    check_unique_ids,
    format_attributes,
    parse_label,
    validate_id,
)
from fashion_msa.data.safe_pickle import load_untrusted

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_RECORD_FIELDS = ("id", "text", "label", "image", "attributes")


def _split_records(path: pathlib.Path) -> list[tuple[Any, Any]]:
    """Return (raw id, record) pairs of one split file."""
    data = load_untrusted(path)
    if isinstance(data, dict):
        return list(data.items())
    if isinstance(data, list):
        return [
            (record.get("id") if isinstance(record, dict) else None, record)
            for record in data
        ]
    raise ValueError(
        f"{path}: expected a dict from post id to record or a list of records, "
        f"got {type(data).__name__}"
    )


def _load_attribute_files(
    root: pathlib.Path,
) -> tuple[dict[str, str], dict[str, str], list[Skip]]:
    """Merge every attribute_dict*.pkl.

    Returns the attributes by id, a description of each id whose files
    disagree, and the malformed entries.
    """
    merged: dict[str, str] = {}
    conflicts: dict[str, str] = {}
    problems: list[Skip] = []
    for path in sorted(root.glob("attribute_dict*.pkl")):
        data = load_untrusted(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a dict from post id to attributes")
        for raw_id, raw_attributes in data.items():
            try:
                post_id = validate_id(raw_id)
                attributes = format_attributes(raw_attributes)
            except ValueError as error:
                problems.append(
                    Skip(
                        str(raw_id),
                        SkipReason.MALFORMED_RECORD,
                        f"{path.name}: {error}",
                    )
                )
                continue
            if post_id in merged and merged[post_id] != attributes:
                conflicts[post_id] = (
                    f"{path.name} gives {attributes!r}, an earlier file "
                    f"{merged[post_id]!r}"
                )
                continue
            merged[post_id] = attributes
    return merged, conflicts, problems


def _find_image(root: pathlib.Path, post_id: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if (root / "images" / f"{post_id}{suffix}").exists():
            return f"images/{post_id}{suffix}"
    return f"images/{post_id}.jpg"


def _post_from_record(
    post_id: str,
    record: Any,
    split: str,
    root: pathlib.Path,
    file_attributes: dict[str, str],
    attribute_conflicts: dict[str, str],
    label_names: Sequence[str] | None,
) -> Post | Skip:
    if post_id in attribute_conflicts:
        return Skip(
            post_id, SkipReason.CONFLICTING_ATTRIBUTES, attribute_conflicts[post_id]
        )
    if not isinstance(record, dict):
        return Skip(post_id, SkipReason.MALFORMED_RECORD, "record is not a dict")
    if not isinstance(record.get("text"), str):
        return Skip(post_id, SkipReason.MISSING_FIELD, "no text string")
    if record.get("label") is None:
        return Skip(post_id, SkipReason.MISSING_FIELD, "no label")
    try:
        label = parse_label(record["label"], label_names)
    except ValueError as error:
        return Skip(post_id, SkipReason.UNKNOWN_LABEL, str(error))

    try:
        attributes = format_attributes(record.get("attributes"))
    except ValueError as error:
        return Skip(post_id, SkipReason.MALFORMED_RECORD, str(error))
    if post_id in file_attributes:
        if attributes and attributes != file_attributes[post_id]:
            return Skip(
                post_id,
                SkipReason.CONFLICTING_ATTRIBUTES,
                f"record gives {attributes!r}, attribute file "
                f"{file_attributes[post_id]!r}",
            )
        attributes = file_attributes[post_id]

    image = record.get("image") or _find_image(root, post_id)
    if not isinstance(image, str):
        return Skip(post_id, SkipReason.MALFORMED_RECORD, "image is not a path string")
    image_path = check_image_path(root, image, post_id)
    if isinstance(image_path, Skip):
        return image_path

    metadata = {
        str(key): str(value)
        for key, value in record.items()
        if key not in _RECORD_FIELDS and isinstance(value, str | int | float | bool)
    }
    return Post(
        id=post_id,
        text=record["text"],
        attributes=attributes,
        image_path=image_path,
        label=label,
        split=split,
        metadata=metadata,
    )


def import_fashion_senti(
    input_dir: str | pathlib.Path, label_names: Sequence[str] | None = None
) -> ImportResult:
    """Read the FashionSenti layout (described in the module docstring).

    Args:
      input_dir: the release folder.
      label_names: class name of each integer label, e.g.
        ("negative", "neutral", "positive"). Without it integer labels are
        skipped as unknown.

    Raises:
      FileNotFoundError: no final_dict_{split}.pkl file.
      safe_pickle.UnsafePickleError: a pickle names a class other than a plain
        container or scalar.
      DuplicateIdError: an id occurs twice, within or across splits.
    """
    root = pathlib.Path(input_dir)
    split_paths = {
        split: root / f"final_dict_{split}.pkl"
        for split in SPLITS
        if (root / f"final_dict_{split}.pkl").is_file()
    }
    if not split_paths:
        raise FileNotFoundError(
            f"no final_dict_{{train,val,test}}.pkl in {root}; is it a "
            "FashionSenti folder?"
        )

    file_attributes, attribute_conflicts, skipped = _load_attribute_files(root)
    posts: list[Post] = []
    ids: list[str] = []
    for split, path in split_paths.items():
        for index, (raw_id, record) in enumerate(_split_records(path)):
            try:
                post_id = validate_id(raw_id)
            except ValueError as error:
                skipped.append(
                    Skip(
                        f"{path.name} entry {index}", SkipReason.INVALID_ID, str(error)
                    )
                )
                continue
            ids.append(post_id)
            result = _post_from_record(
                post_id,
                record,
                split,
                root,
                file_attributes,
                attribute_conflicts,
                label_names,
            )
            (skipped if isinstance(result, Skip) else posts).append(result)
    check_unique_ids(ids, f"FashionSenti split files in {root}")

    counts = {
        "posts": len(posts),
        "skipped": len(skipped),
        "attribute_entries": len(file_attributes),
        "attribute_entries_without_post": len(set(file_attributes) - set(ids)),
    }
    for split in SPLITS:
        counts[f"posts_{split}"] = sum(post.split == split for post in posts)
    return ImportResult(posts=posts, skipped=skipped, counts=counts)
