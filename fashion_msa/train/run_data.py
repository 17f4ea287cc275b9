"""The run's dataset: build it into the workdir when missing, open splits, make loaders.

`config.data.data_dir` names the TFDS data directory, and empty means
WORKDIR/data. When that directory contains no build of `config.data.source`, the
dataset is built there from `config.data.input_dir` (and `pseudo_dir`). The
synthetic source draws its posts into `input_dir`, by default
WORKDIR/synthetic_posts, with its pseudo data in the `pseudo` folder inside.
"""

import pathlib
from collections.abc import Mapping
from typing import Any

import grain
import jax
from absl import logging
from jax.experimental import multihost_utils

from fashion_msa.clip.tokenizer import CLIPTextTokenizer
from fashion_msa.data import builder, pipeline
from fashion_msa.data.report import read_report


def resolve_data_dir(
    data_config: Mapping[str, Any], workdir: pathlib.Path
) -> pathlib.Path:
    """Return the TFDS data directory of the run."""
    if data_config.get("data_dir"):
        return pathlib.Path(data_config["data_dir"]).expanduser().absolute()
    return workdir.absolute() / "data"


def is_built(data_dir: pathlib.Path, source: str) -> bool:
    """Return whether `data_dir` contains a finished build of `source`."""
    return (builder.dataset_dir(data_dir, source) / "dataset_info.json").is_file()


def ensure_dataset(
    data_config: Mapping[str, Any], workdir: pathlib.Path, show_progress: bool = True
) -> pathlib.Path:
    """Build the dataset unless it exists, returning the data directory.

    In a multi-process run, process 0 builds and the others wait for it.

    Raises:
      ValueError: the dataset must be built but `config.data.input_dir` is empty
        (sources other than synthetic).
    """
    source = data_config["source"]
    data_dir = resolve_data_dir(data_config, workdir)
    if not is_built(data_dir, source) and jax.process_index() == 0:
        input_dir = data_config.get("input_dir")
        if not input_dir:
            if source != "synthetic":
                raise ValueError(
                    f"no {source} dataset in {data_dir} and config.data.input_dir is "
                    "empty; set --config.data.input_dir to the raw posts"
                )
            input_dir = str(workdir.absolute() / "synthetic_posts")
        pseudo_dir = data_config.get("pseudo_dir") or None
        logging.info(
            "Building the %s dataset from %s (pseudo-data folder: %s) into %s",
            source,
            input_dir,
            pseudo_dir or "none configured",
            data_dir,
        )
        report = builder.build_dataset(
            source,
            input_dir,
            data_dir,
            pseudo_dir=pseudo_dir,
            strict=bool(data_config.get("strict", False)),
            show_progress=show_progress,
            **dict(data_config.get("source_options") or {}),
        )
        logging.info("Dataset built:\n%s", report.format_text(max_listed=10))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("fashion_msa dataset built")
    return data_dir


def build_report(data_dir: pathlib.Path, source: str) -> dict[str, Any]:
    """Return the dataset's build report (split sizes, skips, pseudo counts)."""
    return read_report(builder.dataset_dir(data_dir, source))


def open_split(data_dir: pathlib.Path, source: str, split: str) -> Any:
    """Return the random-access TFDS source of one split."""
    return builder.load_split(data_dir, source, split)


def train_loader(
    split_source: Any,
    *,
    batch_size: int,
    image_size: int,
    tokenizer: CLIPTextTokenizer,
    seed: int,
    num_epochs: int,
    num_workers: int,
) -> grain.DataLoader:
    """Return a loader of shuffled training batches (this process's rows)."""
    return pipeline.make_train_loader(
        split_source,
        global_batch_size=batch_size,
        image_size=image_size,
        tokenizer=tokenizer,
        seed=seed,
        num_epochs=num_epochs,
        worker_count=num_workers,
    )


def eval_loader(
    split_source: Any,
    *,
    batch_size: int,
    image_size: int,
    tokenizer: CLIPTextTokenizer,
    num_workers: int,
) -> grain.DataLoader:
    """Return a loader of every post once, the last batch padded with invalid rows."""
    return pipeline.make_eval_loader(
        split_source,
        global_batch_size=batch_size,
        image_size=image_size,
        tokenizer=tokenizer,
        worker_count=num_workers,
    )


def steps_per_epoch(num_posts: int, batch_size: int) -> int:
    """Training steps per epoch (full batches only)."""
    return pipeline.train_steps_per_epoch(num_posts, batch_size)
