"""Input posts for pseudo-data generation, and the attribute string helpers."""

from __future__ import annotations

import collections
import os

from absl import logging

from fashion_msa.data.importers import SOURCES, load_posts
from fashion_msa.data.posts import Post, Skip


def load_input_posts(
    source: str, input_path: str | os.PathLike[str], limit: int | None = None
) -> tuple[list[Post], list[Skip]]:
    """Read the posts of `source` at `input_path`; return (posts, skipped posts).

    Args:
      source: one of `fashion_msa.data.importers.SOURCES`; "manifest" takes a
        JSONL or CSV manifest file, or the folder that contains manifest.jsonl or
        manifest.csv.
      input_path: the manifest or the source folder.
      limit: keep only the first `limit` posts, in source order.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    result = load_posts(source, input_path)
    if result.skipped:
        reasons = collections.Counter(str(skip.reason) for skip in result.skipped)
        logging.warning(
            "%d input posts skipped: %s; first: %s",
            len(result.skipped),
            dict(reasons),
            "; ".join(str(skip) for skip in result.skipped[:5]),
        )
    posts = list(result.posts)
    if limit is not None:
        posts = posts[:limit]
    return posts, list(result.skipped)


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
