r"""Posts per second of the grain training loader, against the fine-tuning step's rate.

Builds (once, then reuses) two TFDS datasets with `fashion_msa.data.builder`:
the MVSA-Single copy (`--mvsa_dir`) and a synthetic set with pseudo data and
`--synthetic_image_size` pixel images. For each dataset, each image size the
CLIP presets use (64 for "tiny", 224 for "vit-b-32") and each worker count,
it iterates `fashion_msa.data.pipeline.make_train_loader` and reports posts
per second after `--warmup_batches` (which absorb worker start-up), and the
time to the first batch.

The consumption rate of the fine-tuning step comes from step_throughput JSON
files (`--step_json`, the fastest JAX fine-tuning variant of each preset), or
is measured here with the same code (`--measure_steps` steps) when no file
covers a preset. The goal is a loader at least 3x faster than the step.

The loader and the step are timed apart; in training they share the CPU
cores, so the ratio says how much of the machine the loader would take.

Run from the repository root:

  python -m benchmarks.input_pipeline --presets=tiny,vit-b-32 \
      --step_json=/tmp/step_throughput.json --output=/tmp/input_pipeline.json
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from benchmarks import common

DATASETS = ("mvsa_single", "synthetic")
PRESET_IMAGE_SIZES = {"tiny": 64, "vit-b-32": 224}
GOAL_RATIO = 3.0

_DATASETS = flags.DEFINE_list(
    "datasets", list(DATASETS), "Datasets to read: mvsa_single, synthetic."
)
_PRESETS = flags.DEFINE_list(
    "presets", list(PRESET_IMAGE_SIZES), "CLIP presets whose image size to feed."
)
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts.")
_READ_THREADS = flags.DEFINE_integer(
    "read_threads", 2, "Read threads per process or worker (the pipeline's default)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Posts per batch.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches per configuration.")
_WARMUP_BATCHES = flags.DEFINE_integer(
    "warmup_batches", 2, "Untimed batches first (worker start-up, first reads)."
)
_MVSA_DIR = flags.DEFINE_string(
    "mvsa_dir",
    str(pathlib.Path(__file__).resolve().parents[2] / "shared/data/mvsa_single"),
    "MVSA-Single folder to build from.",
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    str(pathlib.Path(tempfile.gettempdir()) / "fashion_msa_benchmarks" / "data"),
    "TFDS data directory; datasets already built there are reused.",
)
_SYNTHETIC_DIR = flags.DEFINE_string(
    "synthetic_dir",
    str(pathlib.Path(tempfile.gettempdir()) / "fashion_msa_benchmarks" / "synthetic"),
    "Folder the synthetic posts are drawn into (reused when drawn alike).",
)
_SYNTHETIC_POSTS = flags.DEFINE_integer(
    "synthetic_posts", 400, "Posts in the synthetic set (70% in the train split)."
)
_SYNTHETIC_IMAGE_SIZE = flags.DEFINE_integer(
    "synthetic_image_size",
    512,
    "Side in pixels of the synthetic images and pseudo images (Stable Diffusion "
    "1.5 renders 512).",
)
_STEP_JSON = flags.DEFINE_list(
    "step_json", [], "step_throughput JSON files giving the fine-tuning step rate."
)
_MEASURE_STEPS = flags.DEFINE_integer(
    "measure_steps",
    3,
    "Fine-tuning steps to time for a preset that no --step_json covers; 0 leaves "
    "the step rate out.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Shuffling seed.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON file for the results; '' = none.")


def ensure_dataset(name: str, data_dir: pathlib.Path) -> dict[str, Any]:
    """Build dataset `name` into `data_dir` unless it is built; return build info."""
    from fashion_msa.data import builder

    try:
        builder.load_split(data_dir, name, "train")
        return {"built_now": False, "build_s": 0.0}
    except FileNotFoundError:
        pass
    if name == "mvsa_single":
        input_dir, options = pathlib.Path(_MVSA_DIR.value), {}
        if not (input_dir / "labelResultAll.txt").is_file():
            raise app.UsageError(
                f"no MVSA-Single folder at {input_dir}; set --mvsa_dir or drop "
                "mvsa_single from --datasets"
            )
    else:
        input_dir = pathlib.Path(_SYNTHETIC_DIR.value)
        options = {
            "num_posts": _SYNTHETIC_POSTS.value,
            "image_size": _SYNTHETIC_IMAGE_SIZE.value,
            "seed": _SEED.value,
        }
    logging.info("Building %s from %s into %s", name, input_dir, data_dir)
    start = time.perf_counter()
    report = builder.build_dataset(name, input_dir, data_dir, **options)
    seconds = time.perf_counter() - start
    logging.info("Built %s in %.1f s", name, seconds)
    return {"built_now": True, "build_s": seconds, "report": _report_summary(report)}


def _report_summary(report: Any) -> Any:
    for method in ("to_dict", "as_dict"):
        if hasattr(report, method):
            return getattr(report, method)()
    return str(report)


def time_loader(
    source: Any, image_size: int, tokenizer: Any, workers: int
) -> dict[str, Any]:
    """Iterate the training loader; return posts/s after warm-up and other timings."""
    from fashion_msa.data import pipeline

    loader = pipeline.make_train_loader(
        source,
        global_batch_size=_BATCH_SIZE.value,
        image_size=image_size,
        tokenizer=tokenizer,
        seed=_SEED.value,
        worker_count=workers,
        read_threads=_READ_THREADS.value,
        process_index=0,
        process_count=1,
    )
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first_batch_s = time.perf_counter() - start
    for _ in range(_WARMUP_BATCHES.value):
        next(iterator)
    batch_times = []
    posts = 0
    for _ in range(_BATCHES.value):
        batch_start = time.perf_counter()
        batch = next(iterator)
        batch_times.append(time.perf_counter() - batch_start)
        posts += len(batch["label"])
    total_s = sum(batch_times)
    # Dropping the iterator stops grain's worker processes.
    del iterator, loader
    return {
        "posts_per_s": posts / total_s,
        "first_batch_s": first_batch_s,
        "batch_time_s": common.summarize_times(batch_times),
        "has_pseudo_fraction": float(np.mean(batch["has_pseudo"])),
    }


def step_rates_from_json(paths: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Return the fastest JAX fine-tuning rate of each preset in the JSON files."""
    rates: dict[str, dict[str, Any]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        preset = data["config"]["preset"]
        for record in data["results"]:
            if record["impl"] != "jax" or record["step_kind"] != "finetune":
                continue
            best = rates.get(preset)
            if best is None or record["examples_per_s"] > best["examples_per_s"]:
                rates[preset] = {
                    "examples_per_s": record["examples_per_s"],
                    "source": str(path),
                    "variant": record["name"],
                    "dtype": data["config"]["dtype"],
                    "batch_size": data["config"]["batch_size"],
                }
    return rates


def measure_step_rate(preset: str, steps_count: int) -> dict[str, Any]:
    """Time the JAX fine-tuning step of `preset` on random full-length batches."""
    import jax

    from benchmarks import batches as batch_lib
    from benchmarks import jax_steps as jax_steps_lib
    from fashion_msa.model.factory import create_model
    from fashion_msa.model.msa import init_params
    from fashion_msa.train import sharding

    model_config = jax_steps_lib.build_model_config(preset, "float32", True)
    model = create_model(model_config)
    mesh = sharding.create_mesh()
    rng = np.random.default_rng(_SEED.value)
    sampler = batch_lib.LengthSampler(None)
    host_batch = batch_lib.random_batch(
        rng, model.clip_config, _BATCH_SIZE.value, sampler
    )
    params = init_params(model, jax.random.key(_SEED.value))
    jax_steps = jax_steps_lib.JaxSteps("finetune", model, params, mesh, _SEED.value)
    batch = sharding.shard_batch(host_batch, mesh)
    compiled, _, _ = jax_steps.compile(batch)
    jax_steps.run(compiled, batch)
    times = [
        common.time_call(lambda: jax_steps.run(compiled, batch))
        for _ in range(steps_count)
    ]
    median = float(np.median(times))
    return {
        "examples_per_s": _BATCH_SIZE.value / median,
        "source": "measured",
        "variant": "jax/full",
        "dtype": "float32",
        "batch_size": _BATCH_SIZE.value,
        "step_time_s": common.summarize_times(times),
    }


def check_flags() -> tuple[list[str], list[str], list[int]]:
    """Validate the list flags; return (datasets, presets, worker counts)."""
    datasets = list(_DATASETS.value)
    presets = list(_PRESETS.value)
    if not datasets or set(datasets) - set(DATASETS):
        raise app.UsageError(f"--datasets must name some of {DATASETS}")
    if not presets or set(presets) - set(PRESET_IMAGE_SIZES):
        raise app.UsageError(f"--presets must name some of {list(PRESET_IMAGE_SIZES)}")
    try:
        workers = [int(w) for w in _WORKERS.value]
    except ValueError:
        raise app.UsageError(
            f"--workers must be integers, got {_WORKERS.value}"
        ) from None
    if not workers or min(workers) < 0:
        raise app.UsageError(f"--workers must be >= 0, got {_WORKERS.value}")
    if _BATCHES.value < 1 or _BATCH_SIZE.value < 1:
        raise app.UsageError("--batches and --batch_size must be at least 1")
    return datasets, presets, workers


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    datasets, presets, workers = check_flags()
    machine = common.machine_info()
    logging.info("Load average before the run: %s", machine["load_average"])

    from fashion_msa.clip.tokenizer import load_tokenizer
    from fashion_msa.data import builder

    data_dir = pathlib.Path(_DATA_DIR.value)
    builds = {name: ensure_dataset(name, data_dir) for name in datasets}
    tokenizer = load_tokenizer()

    step_rates = step_rates_from_json(_STEP_JSON.value)
    for preset in presets:
        if preset not in step_rates and _MEASURE_STEPS.value > 0:
            logging.info("Measuring the %s fine-tuning step", preset)
            step_rates[preset] = measure_step_rate(preset, _MEASURE_STEPS.value)

    records = []
    for name in datasets:
        source = builder.load_split(data_dir, name, "train")
        for preset in presets:
            image_size = PRESET_IMAGE_SIZES[preset]
            for worker_count in workers:
                logging.info(
                    "%s at %d px with %d workers", name, image_size, worker_count
                )
                timing = time_loader(source, image_size, tokenizer, worker_count)
                record = {
                    "dataset": name,
                    "train_posts": len(source),
                    "preset": preset,
                    "image_size": image_size,
                    "workers": worker_count,
                    "read_threads": _READ_THREADS.value,
                    **timing,
                }
                rate = step_rates.get(preset)
                if rate is not None:
                    record["step_examples_per_s"] = rate["examples_per_s"]
                    record["loader_over_step"] = (
                        timing["posts_per_s"] / rate["examples_per_s"]
                    )
                    record["meets_goal"] = record["loader_over_step"] >= GOAL_RATIO
                records.append(record)
                logging.info(
                    "  %.1f posts/s (first batch after %.2f s)",
                    timing["posts_per_s"],
                    timing["first_batch_s"],
                )

    result = {
        "benchmark": "input_pipeline",
        "config": {
            "datasets": datasets,
            "presets": presets,
            "workers": workers,
            "read_threads": _READ_THREADS.value,
            "batch_size": _BATCH_SIZE.value,
            "batches": _BATCHES.value,
            "warmup_batches": _WARMUP_BATCHES.value,
            "synthetic_posts": _SYNTHETIC_POSTS.value,
            "synthetic_image_size": _SYNTHETIC_IMAGE_SIZE.value,
            "goal_ratio": GOAL_RATIO,
        },
        "machine": machine,
        "builds": builds,
        "step_rates": step_rates,
        "results": records,
        "host_memory": common.host_memory(),
        "load_average_after": os.getloadavg(),
    }
    print_table(result)
    if _OUTPUT.value:
        common.write_json(_OUTPUT.value, result)
        logging.info("Wrote %s", _OUTPUT.value)


def print_table(result: dict[str, Any]) -> None:
    """Print one row per dataset, preset and worker count."""
    rows = [
        [
            r["dataset"],
            r["preset"],
            r["image_size"],
            r["workers"],
            r["posts_per_s"],
            r["first_batch_s"],
            r.get("step_examples_per_s"),
            r.get("loader_over_step"),
        ]
        for r in result["results"]
    ]
    headers = [
        "dataset",
        "preset",
        "px",
        "workers",
        "posts/s",
        "first_batch_s",
        "step_ex/s",
        "loader/step",
    ]
    print(common.format_table(headers, rows))


if __name__ == "__main__":
    app.run(main)
