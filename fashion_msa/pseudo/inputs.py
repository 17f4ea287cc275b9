"""Input posts for pseudo-data generation, and the attribute string helpers."""

from __future__ import annotations

import csv
import json
import os
import pathlib

from absl import logging

from fashion_msa.data.posts import Post, Skip, format_attributes, validate_id

SOURCES = ("manifest", "mvsa_single", "fashion_senti", "synthetic")


def load_input_posts(
    source: str, input_path: str | os.PathLike[str], limit: int | None = None
) -> tuple[list[Post], list[Skip]]:
    """Read the posts of `source` at `input_path`; return (posts, skipped posts).

    Args:
      source: one of `SOURCES`; "manifest" takes a JSONL or CSV file (or a folder
        holding one manifest file) with id, text, image path relative to the
        manifest, attributes, label and split.
      input_path: the manifest file or the source folder.
      limit: keep only the first `limit` posts, in source order.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    try:
        from fashion_msa.data.importers import load_posts
    except ImportError:
        # TODO: drop this reader once fashion_msa.data.importers is merged.
        if source != "manifest":
            raise
        posts, skipped = _read_manifest(pathlib.Path(input_path))
    else:
        result = load_posts(source, input_path)
        posts, skipped = list(result.posts), list(result.skipped)
    for skip in skipped:
        logging.warning("Input post skipped: %s", skip)
    if limit is not None:
        posts = posts[:limit]
    return posts, skipped


def _read_manifest(path: pathlib.Path) -> tuple[list[Post], list[Skip]]:
    if path.is_dir():
        found = sorted(
            p for p in path.iterdir() if p.suffix in (".jsonl", ".csv") and p.is_file()
        )
        if len(found) != 1:
            raise FileNotFoundError(f"expected one .jsonl or .csv manifest in {path}")
        path = found[0]
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = [
            json.loads(line) for line in path.read_text("utf-8").splitlines() if line
        ]
    posts, skipped = [], []
    for number, row in enumerate(rows, start=1):
        try:
            post_id = validate_id(row.get("id"))
            image = row.get("image_path") or row.get("image")
            if not image:
                raise ValueError("missing image path")
            posts.append(
                Post(
                    id=post_id,
                    text=str(row.get("text") or ""),
                    attributes=format_attributes(row.get("attributes")),
                    image_path=(path.parent / image).resolve(),
                    label=str(row.get("label") or ""),
                    split=str(row.get("split") or ""),
                )
            )
        except ValueError as error:
            skipped.append(
                Skip(str(row.get("id", f"row {number}")), "malformed", str(error))
            )
    return posts, skipped


def parse_attributes(attributes: str) -> dict[str, str]:
    """Split "name: value; name: value" into a dict, in order.

    An entry without ':' keeps its text as the value under the name "attribute";
    repeated names keep the last value.
    """
    parsed: dict[str, str] = {}
    for entry in attributes.split(";"):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, value = entry.partition(":")
        if sep:
            parsed[name.strip()] = value.strip()
        else:
            parsed["attribute"] = entry
    return parsed


def format_attribute_dict(attributes: dict[str, str]) -> str:
    """Join a name-to-value dict into "name: value; name: value"."""
    return "; ".join(f"{name}: {value}" for name, value in attributes.items())
