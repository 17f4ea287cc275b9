"""Importer for a generic JSONL or CSV manifest of fashion posts.

A manifest has one post per JSON line or CSV row, with these fields:

  id          unique string (or integer); used as a file name, so no "/".
  text        the post text.
  image       image path relative to the manifest's folder.
  label       "negative", "neutral" or "positive" (any case), or the class id
              0, 1 or 2 in that order.
  split       "train", "val" or "test".
  attributes  optional: "name: value; name: value", or in JSONL a mapping from
              name to value.

In JSONL an optional "metadata" object and any other keys become the post's
metadata (values as strings); in CSV every other column does.
"""

import csv
import json
import pathlib
from collections.abc import Iterator
from typing import Any

from fashion_msa.data.posts import (
    LABELS,
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

MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")
REQUIRED_FIELDS = ("id", "text", "image", "label", "split")
OPTIONAL_FIELDS = ("attributes", "metadata")


def find_manifest(input_dir: pathlib.Path, manifest: str | None = None) -> pathlib.Path:
    """Return the manifest file: `input_dir` itself, `manifest`, or the default name.

    Raises FileNotFoundError when there is none and ValueError when both
    default names exist.
    """
    if input_dir.is_file():
        return input_dir
    if manifest is not None:
        path = input_dir / manifest
        if not path.is_file():
            raise FileNotFoundError(f"manifest {path} not found")
        return path
    found = [
        input_dir / name for name in MANIFEST_NAMES if (input_dir / name).is_file()
    ]
    if not found:
        raise FileNotFoundError(
            f"no manifest in {input_dir}: expected one of {', '.join(MANIFEST_NAMES)}"
        )
    if len(found) > 1:
        raise ValueError(
            f"{input_dir} has both {found[0].name} and {found[1].name}; pass "
            "manifest=NAME to choose one"
        )
    return found[0]


def _read_jsonl(path: pathlib.Path) -> Iterator[tuple[int, dict[str, Any] | Skip]]:
    with path.open(encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield (
                    line_number,
                    Skip(
                        f"line {line_number}", SkipReason.MALFORMED_RECORD, str(error)
                    ),
                )
                continue
            if not isinstance(record, dict):
                yield (
                    line_number,
                    Skip(
                        f"line {line_number}",
                        SkipReason.MALFORMED_RECORD,
                        f"expected a JSON object, got {type(record).__name__}",
                    ),
                )
                continue
            yield line_number, record


def _read_csv(path: pathlib.Path) -> Iterator[tuple[int, dict[str, Any] | Skip]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [
            name for name in REQUIRED_FIELDS if name not in (reader.fieldnames or [])
        ]
        if missing:
            raise ValueError(f"{path}: header lacks the columns {', '.join(missing)}")
        for record in reader:
            # A row with more cells than the header puts them under the key None.
            if None in record:
                yield (
                    reader.line_num,
                    Skip(
                        f"line {reader.line_num}",
                        SkipReason.MALFORMED_RECORD,
                        "row has more cells than the header",
                    ),
                )
                continue
            yield reader.line_num, record


def _parse_manifest_label(raw: Any) -> str:
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw.strip())
    return parse_label(raw, label_names=LABELS)


def _metadata(record: dict[str, Any]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    nested = record.get("metadata")
    if isinstance(nested, dict):
        metadata.update({str(key): str(value) for key, value in nested.items()})
    elif nested not in (None, ""):
        metadata["metadata"] = str(nested)
    for key, value in record.items():
        if key not in REQUIRED_FIELDS and key not in OPTIONAL_FIELDS:
            metadata[str(key)] = "" if value is None else str(value)
    return metadata


def _post_from_record(
    record: dict[str, Any], post_id: str, root: pathlib.Path
) -> Post | Skip:
    missing = [name for name in REQUIRED_FIELDS if record.get(name) in (None, "")]
    # An empty text is a valid post; only an absent one is missing.
    if "text" in missing and record.get("text") == "":
        missing.remove("text")
    if missing:
        return Skip(post_id, SkipReason.MISSING_FIELD, f"no {', '.join(missing)}")
    if not isinstance(record["text"], str):
        return Skip(post_id, SkipReason.MALFORMED_RECORD, "text is not a string")

    try:
        label = _parse_manifest_label(record["label"])
    except ValueError as error:
        return Skip(post_id, SkipReason.UNKNOWN_LABEL, str(error))

    split = str(record["split"]).strip().lower()
    if split not in SPLITS:
        return Skip(
            post_id,
            SkipReason.UNKNOWN_SPLIT,
            f"split {record['split']!r} is not one of {', '.join(SPLITS)}",
        )

    try:
        attributes = format_attributes(record.get("attributes"))
    except ValueError as error:
        return Skip(post_id, SkipReason.MALFORMED_RECORD, str(error))

    image_path = check_image_path(root, str(record["image"]), post_id)
    if isinstance(image_path, Skip):
        return image_path

    return Post(
        id=post_id,
        text=record["text"],
        attributes=attributes,
        image_path=image_path,
        label=label,
        split=split,
        metadata=_metadata(record),
    )


def import_manifest(
    input_dir: str | pathlib.Path, manifest: str | None = None
) -> ImportResult:
    """Read a JSONL or CSV manifest (format in the module docstring).

    Args:
      input_dir: the folder holding the manifest, or the manifest file itself.
        Image paths are relative to the manifest's folder and may not leave it.
      manifest: file name inside `input_dir`; by default manifest.jsonl or
        manifest.csv, whichever exists.

    Raises:
      DuplicateIdError: an id occurs on more than one line.
    """
    path = find_manifest(pathlib.Path(input_dir), manifest)
    root = path.parent
    read = _read_csv if path.suffix.lower() == ".csv" else _read_jsonl

    posts: list[Post] = []
    skipped: list[Skip] = []
    ids: list[str] = []
    records = 0
    for line_number, record in read(path):
        records += 1
        if isinstance(record, Skip):
            skipped.append(record)
            continue
        try:
            post_id = validate_id(record.get("id"))
        except ValueError as error:
            skipped.append(
                Skip(f"line {line_number}", SkipReason.INVALID_ID, str(error))
            )
            continue
        ids.append(post_id)
        result = _post_from_record(record, post_id, root)
        (skipped if isinstance(result, Skip) else posts).append(result)

    check_unique_ids(ids, f"manifest {path}")
    return ImportResult(
        posts=posts,
        skipped=skipped,
        counts={"records": records, "posts": len(posts), "skipped": len(skipped)},
    )
