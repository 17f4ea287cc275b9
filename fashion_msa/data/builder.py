"""TFDS builder that bundles posts with their pseudo data, and `build_dataset`.

`FashionPosts` is a `tfds.core.GeneratorBasedBuilder` with one builder config
per source (manifest, fashion_senti, mvsa_single, synthetic). It writes
array_record files, which `as_data_source` reads with random access and no
TensorFlow. Images are stored as their encoded file bytes and decoded by the
input pipeline, so TFDS never encodes or decodes an image (that would need
TensorFlow).

Features of a post:

  id, text, attributes          strings (attributes "name: value; ...", or "")
  image                         encoded bytes of the original image
  pseudo/description            the LLM's image description, or ""
  pseudo/attributes             "name: value; ..." of the pseudo image, or ""
  pseudo/image                  encoded bytes of the pseudo image, or b""
  has_pseudo                    False when the post has no usable pseudo data
  label                         ClassLabel negative (0), neutral (1), positive (2)
  metadata                      JSON object of source strings; MVSA stores
                                text_label and image_label

Reading back gives `bytes` for every string feature. TFDS shuffles records on
write, so record i is not the i-th post of the input.

A build first imports the posts and decodes every image (skips go into the
build report), then writes. A dataset lives in DATA_DIR/fashion_posts/SOURCE/
VERSION. TFDS writes it into an `incomplete.*` sibling folder and renames that
only once every split and the build report are written, so a half-built
dataset is never visible. A failed build removes its folder.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import inspect
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from absl import logging
from etils import epath

from fashion_msa.data import importers
from fashion_msa.data.posts import LABELS, SPLITS, Post, Skip
from fashion_msa.data.pseudo_join import PseudoIndex, PseudoRecord, load_pseudo
from fashion_msa.data.report import BuildReport
from fashion_msa.data.validation import DEFAULT_MAX_PIXELS, BadImageError, read_image

DATASET_NAME = "fashion_posts"
FILE_FORMAT = "array_record"
_DESCRIPTIONS = {
    "manifest": "Posts from a JSONL or CSV manifest.",
    "fashion_senti": "FashionSenti (Yuan and Lam, 2022) in its release layout.",
    "mvsa_single": "MVSA-Single (Niu et al., 2016), text and image labels merged.",
    "synthetic": "Procedurally drawn fashion posts with pseudo data.",
}


class BuildError(RuntimeError):
    """A strict build met a skipped post or a pseudo-data problem."""

    def __init__(self, message: str, report: BuildReport):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class _CheckedPost:
    """A post whose image decoded, with the digests of the checked bytes."""

    post: Post
    image_digest: bytes
    pseudo: PseudoRecord | None
    pseudo_digest: bytes


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _read_unchanged(path: pathlib.Path, digest: bytes) -> bytes:
    """Read a file checked earlier in this build; raise if it changed since."""
    data = path.read_bytes()
    if _digest(data) != digest:
        raise RuntimeError(f"{path} changed while the dataset was being built")
    return data


def _example(entry: _CheckedPost) -> dict[str, Any]:
    """Return the TFDS example of a checked post, rereading its image files."""
    post, pseudo = entry.post, entry.pseudo
    example = {
        "id": post.id,
        "text": post.text,
        "attributes": post.attributes,
        "image": _read_unchanged(post.image_path, entry.image_digest),
        "label": post.label,
        "metadata": json.dumps(post.metadata, sort_keys=True, ensure_ascii=False),
        # Without pseudo data the pseudo features stay empty, and the model
        # masks them by has_pseudo.
        "pseudo": {"description": "", "attributes": "", "image": b""},
        "has_pseudo": pseudo is not None,
    }
    if pseudo is not None:
        example["pseudo"] = {
            "description": pseudo.description,
            "attributes": pseudo.attributes,
            "image": _read_unchanged(pseudo.image_path, entry.pseudo_digest),
        }
    return example


def _bytes_feature(doc: str) -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=(), dtype=np.object_, doc=doc)


class FashionPosts(tfds.core.GeneratorBasedBuilder):
    """Fashion posts with text, image, attributes, pseudo data and a sentiment label."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=source, description=_DESCRIPTIONS[source])
        for source in importers.SOURCES
    ]

    # TFDS 4.9.10 locates this file and its folder (for optional metadata such
    # as checksums.tsv) through importlib.resources, which needs the
    # importlib_resources backport and fails when the package is imported as a
    # namespace package, as some editable installs do. Both are set directly.
    pkg_dir_path = epath.Path(__file__).parent

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    def __init__(
        self,
        *,
        input_dir: str | pathlib.Path | None = None,
        pseudo_dir: str | pathlib.Path | None = None,
        strict: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        source_options: dict[str, Any] | None = None,
        show_progress: bool = False,
        num_workers: int | None = None,
        published_dir: str | pathlib.Path | None = None,
        **kwargs: Any,
    ):
        """Create the builder. Only building uses `input_dir` and the options below.

        Args:
          input_dir: the source's input folder (or manifest file).
          pseudo_dir: a pseudo-data folder to join by post id. The synthetic
            source uses the one it draws when this is None.
          strict: raise `BuildError` on any skipped post or pseudo problem.
          max_pixels: largest width * height accepted for any image.
          source_options: keyword arguments of the source's importer.
          show_progress: show a tqdm progress bar while images are checked.
          num_workers: threads that read and decode images; default: the CPU
            count, at most 8.
          published_dir: the dataset folder named in the report, when the
            build happens elsewhere and is moved there afterwards.
          **kwargs: `tfds.core.GeneratorBasedBuilder` arguments (config,
            data_dir, ...).
        """
        self._input_dir = None if input_dir is None else pathlib.Path(input_dir)
        self._pseudo_dir = None if pseudo_dir is None else pathlib.Path(pseudo_dir)
        self._strict = strict
        self._max_pixels = max_pixels
        self._source_options = dict(source_options or {})
        self._show_progress = show_progress
        self._num_workers = num_workers or min(8, os.cpu_count() or 1)
        self._published_dir = published_dir
        self._pseudo: PseudoIndex | None = None
        self.report: BuildReport | None = None
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "Fashion posts with text, image, attributes, pseudo data and a "
                "sentiment label."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(doc="Post id, unique in the source."),
                    "text": tfds.features.Text(doc="Post text."),
                    "attributes": tfds.features.Text(
                        doc='Fashion attributes "name: value; ...", or "".'
                    ),
                    "image": _bytes_feature("Encoded bytes of the post image."),
                    "pseudo": tfds.features.FeaturesDict(
                        {
                            "description": tfds.features.Text(
                                doc="Generated image description, or ''."
                            ),
                            "attributes": tfds.features.Text(
                                doc='Pseudo attributes "name: value; ...", or "".'
                            ),
                            "image": _bytes_feature(
                                "Encoded bytes of the pseudo image, or b''."
                            ),
                        }
                    ),
                    "has_pseudo": tfds.features.Tensor(
                        shape=(),
                        dtype=np.bool_,
                        doc="Whether the post has a pseudo description and image.",
                    ),
                    "label": tfds.features.ClassLabel(names=LABELS),
                    "metadata": tfds.features.Text(
                        doc="JSON object of source-specific strings."
                    ),
                }
            ),
        )

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        # self.data_dir is the incomplete.* folder here, so the report is part
        # of the rename that publishes the dataset.
        start = time.perf_counter()
        super()._download_and_prepare(dl_manager, download_config)
        self.report.build_seconds = time.perf_counter() - start
        self.report.write(self.data_dir)

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        if self._input_dir is None:
            raise ValueError(
                f"building {self.name}/{self.builder_config.name} needs input_dir; "
                "use build_dataset() or launch.build_dataset"
            )
        source = self.builder_config.name
        result = importers.load_posts(source, self._input_dir, **self._source_options)
        pseudo_dir = self._pseudo_dir
        if pseudo_dir is None and source == "synthetic":
            pseudo_dir = self._input_dir / "pseudo"
        self._pseudo = load_pseudo(pseudo_dir) if pseudo_dir is not None else None

        # self.data_dir is the incomplete.* folder, renamed to VERSION at the end.
        final_dir = self._published_dir or pathlib.Path(self.data_dir).parent / str(
            self.version
        )
        self.report = BuildReport(
            source=source,
            input_dir=str(self._input_dir.absolute()),
            pseudo_dir=None if pseudo_dir is None else str(pseudo_dir.absolute()),
            dataset_dir=str(final_dir),
            strict=self._strict,
            max_pixels=self._max_pixels,
            import_counts=dict(result.counts),
            skipped=list(result.skipped),
            dropped=list(result.dropped),
        )
        if self._pseudo is not None:
            ids = {post.id for post in result.posts}
            self.report.pseudo_counts = dict(self._pseudo.counts)
            self.report.pseudo_counts["unmatched_pseudo_records"] = len(
                set(self._pseudo.records) - ids
            )
            self.report.pseudo_problems = list(self._pseudo.problems)
        self._fail_if_strict()

        checked = self._check_images(result.posts)
        self._fail_if_strict()
        by_split: dict[str, list[_CheckedPost]] = collections.defaultdict(list)
        for entry in checked:
            by_split[entry.post.split].append(entry)
        if not by_split:
            raise BuildError(
                f"{self._input_dir} gave no usable posts; "
                f"{len(self.report.skipped)} were skipped",
                self.report,
            )
        # Splits in the order train, val, test. A split whose posts were all
        # skipped is absent.
        splits = [split for split in SPLITS if by_split[split]]
        for split in splits:
            entries = by_split[split]
            self.report.split_sizes[split] = len(entries)
            self.report.pseudo_sizes[split] = sum(e.pseudo is not None for e in entries)
        logging.info(
            "Writing %s: %s",
            source,
            ", ".join(f"{split} {n}" for split, n in self.report.split_sizes.items()),
        )
        return {split: self._generate_examples(by_split[split]) for split in splits}

    def _check_images(self, posts: list[Post]) -> list[_CheckedPost]:
        """Decode every image once, recording skips and pseudo problems in the report.

        Checking all posts before writing means a strict build fails before
        any file is written, and a split whose posts were all skipped is left
        out instead of being written empty. Pillow releases the GIL while
        decoding, so a thread pool checks images in parallel.
        """
        progress = tqdm.tqdm(
            total=len(posts),
            desc=f"Checking {self.builder_config.name} images",
            unit=" posts",
            disable=not self._show_progress,
        )
        checked: list[_CheckedPost] = []
        with concurrent.futures.ThreadPoolExecutor(self._num_workers) as executor:
            for outcome, pseudo_problem in executor.map(self._check_post, posts):
                progress.update()
                if pseudo_problem is not None:
                    self.report.pseudo_problems.append(pseudo_problem)
                if isinstance(outcome, Skip):
                    self.report.skipped.append(outcome)
                    progress.set_postfix(skipped=len(self.report.skipped))
                else:
                    checked.append(outcome)
        progress.close()
        return checked

    def _check_post(self, post: Post) -> tuple[_CheckedPost | Skip, Skip | None]:
        """Check a post's images; return the post or its Skip, and any pseudo problem.

        A post whose pseudo image is unusable is kept without pseudo data.
        """
        try:
            image = read_image(post.image_path, self._max_pixels)
        except BadImageError as error:
            return Skip(post.id, error.reason, error.detail), None

        record = None if self._pseudo is None else self._pseudo.records.get(post.id)
        if record is None:
            return _CheckedPost(post, _digest(image), None, b""), None
        try:
            pseudo_image = read_image(record.image_path, self._max_pixels)
        except BadImageError as error:
            problem = Skip(post.id, error.reason, f"pseudo image {error.detail}")
            return _CheckedPost(post, _digest(image), None, b""), problem
        return _CheckedPost(post, _digest(image), record, _digest(pseudo_image)), None

    def _generate_examples(
        self, entries: list[_CheckedPost]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for entry in entries:
            yield entry.post.id, _example(entry)

    def _fail_if_strict(self) -> None:
        problems = self.report.skipped + self.report.pseudo_problems
        if self._strict and problems:
            listed = "\n".join(f"  {problem}" for problem in problems[:50])
            raise BuildError(
                f"strict build of {self.builder_config.name} from {self._input_dir} "
                f"stopped: {len(self.report.skipped)} skipped posts and "
                f"{len(self.report.pseudo_problems)} pseudo-data problems:\n{listed}",
                self.report,
            )


def build_dataset(
    source: str,
    input_dir: str | pathlib.Path,
    data_dir: str | pathlib.Path,
    pseudo_dir: str | pathlib.Path | None = None,
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    show_progress: bool = False,
    num_workers: int | None = None,
    **source_options: Any,
) -> BuildReport:
    """Build the `source` dataset into DATA_DIR/fashion_posts/SOURCE/1.0.0.

    Args:
      source: one of manifest, fashion_senti, mvsa_single, synthetic.
      input_dir: the source's input folder (for synthetic: where to draw it).
      data_dir: the TFDS data directory.
      pseudo_dir: pseudo-data folder to join, if any.
      strict: raise `BuildError` (and write nothing) on any skipped post or
        pseudo-data problem.
      max_pixels: largest width * height accepted for any image.
      overwrite: replace an existing build of this source; without it an
        existing build raises FileExistsError.
      show_progress: show a tqdm progress bar while images are checked.
      num_workers: threads that read and decode images; default: the CPU
        count, at most 8.
      **source_options: keyword arguments of the source's importer (e.g.
        `num_posts` for synthetic, `label_names` for fashion_senti).

    Returns:
      The build report, also written as build_report.json and
      build_report.txt into the dataset folder.

    Raises:
      BuildError: `strict` and something was skipped.
      DuplicateIdError: two posts share an id.
      FileExistsError: the dataset exists and `overwrite` is False.
    """
    if source not in importers.SOURCES:
        raise ValueError(
            f"unknown source {source!r}; choose one of {', '.join(importers.SOURCES)}"
        )
    final_dir = dataset_dir(data_dir, source)
    if final_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{final_dir} already exists; pass overwrite=True (--overwrite) to "
            "rebuild it"
        )

    # A rebuild goes into a temporary data directory next to the old dataset,
    # which stays readable until the new one is complete.
    pathlib.Path(data_dir).mkdir(parents=True, exist_ok=True)
    rebuild_root = None
    if final_dir.exists():
        rebuild_root = pathlib.Path(
            tempfile.mkdtemp(prefix=f".{DATASET_NAME}_rebuild_", dir=data_dir)
        )
    try:
        builder = FashionPosts(
            config=source,
            data_dir=str(rebuild_root or data_dir),
            input_dir=input_dir,
            pseudo_dir=pseudo_dir,
            strict=strict,
            max_pixels=max_pixels,
            source_options=source_options,
            show_progress=show_progress,
            num_workers=num_workers,
            published_dir=final_dir,
        )
        # Nothing is downloaded; the temporary folder keeps TFDS from leaving
        # an empty downloads/ folder in data_dir.
        with tempfile.TemporaryDirectory(
            prefix="fashion_posts_downloads_"
        ) as downloads:
            builder.download_and_prepare(
                file_format=FILE_FORMAT, download_dir=downloads
            )
        if rebuild_root is not None:
            _replace_dir(pathlib.Path(builder.data_dir), final_dir)
    finally:
        if rebuild_root is not None:
            shutil.rmtree(rebuild_root, ignore_errors=True)
    return builder.report


def _replace_dir(new: pathlib.Path, old: pathlib.Path) -> None:
    """Move `new` to `old`'s place, then delete the old folder.

    Between the two renames, for a moment, no dataset folder exists; POSIX has
    no portable atomic exchange of two directories.
    """
    retired = old.with_name(f".{old.name}_replaced_{os.getpid()}")
    old.rename(retired)
    new.rename(old)
    shutil.rmtree(retired)


def dataset_dir(data_dir: str | pathlib.Path, source: str) -> pathlib.Path:
    """Return the folder of the built `source` dataset in `data_dir`."""
    return pathlib.Path(FashionPosts(config=source, data_dir=str(data_dir)).data_dir)


def load_split(data_dir: str | pathlib.Path, source: str, split: str):
    """Return the TFDS data source (random access, no TensorFlow) of one split.

    Raises:
      FileNotFoundError: the dataset has not been built in `data_dir`.
      ValueError: the dataset has no such split.
    """
    builder = FashionPosts(config=source, data_dir=str(data_dir))
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"no {source} dataset in {data_dir}; build it with python -m "
            f"launch.build_dataset --source={source} --input_dir=... "
            f"--data_dir={data_dir}"
        )
    if split not in builder.info.splits:
        raise ValueError(
            f"the {source} dataset has no {split!r} split; it has "
            f"{', '.join(builder.info.splits)}"
        )
    return builder.as_data_source(split)
