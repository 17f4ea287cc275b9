"""Post importers by source name: manifest, fashion_senti, mvsa_single, synthetic.

`load_posts(source, input_dir, **options)` dispatches to the importer of a
source; the options are the keyword arguments of that importer. Every importer
returns an `ImportResult`: the posts to build, the skipped posts with their
reasons, and counts.
"""

import pathlib
from collections.abc import Callable

from fashion_msa.data.fashion_senti import import_fashion_senti
from fashion_msa.data.manifest import import_manifest
from fashion_msa.data.mvsa_single import import_mvsa_single
from fashion_msa.data.posts import (
    LABELS,
    SPLITS,
    DropReason,
    DuplicateIdError,
    ImportResult,
    PathOutsideInputError,
    Post,
    Skip,
    SkipReason,
)
from fashion_msa.data.synthetic import import_synthetic

__all__ = [
    "IMPORTERS",
    "LABELS",
    "SOURCES",
    "SPLITS",
    "DropReason",
    "DuplicateIdError",
    "ImportResult",
    "PathOutsideInputError",
    "Post",
    "Skip",
    "SkipReason",
    "load_posts",
]

IMPORTERS: dict[str, Callable[..., ImportResult]] = {
    "manifest": import_manifest,
    "fashion_senti": import_fashion_senti,
    "mvsa_single": import_mvsa_single,
    "synthetic": import_synthetic,
}
SOURCES: tuple[str, ...] = tuple(IMPORTERS)


def load_posts(source: str, input_dir: str | pathlib.Path, **options) -> ImportResult:
    """Import the posts of `source` from `input_dir`.

    Raises:
      ValueError: `source` is not one of `SOURCES`.
      DuplicateIdError: two posts share an id.
    """
    if source not in IMPORTERS:
        raise ValueError(
            f"unknown source {source!r}; choose one of {', '.join(SOURCES)}"
        )
    return IMPORTERS[source](input_dir, **options)
