r"""Evaluate a training run's best checkpoint on a split of a built dataset.

  python -m launch.evaluate --workdir=/tmp/fashion_msa_demo --split=test

By default the dataset is the one the run trained on. --data_dir (and --source)
point at any other build, for example one made later with launch.build_dataset
from new posts. The metrics are printed as a table and written to
WORKDIR/eval_{source}_{split}.json (or --output).
"""

import json
import pathlib

from absl import app, flags

from fashion_msa.train import checkpointing, inference
from fashion_msa.train.metrics import format_metrics_table

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a launch.train run.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate (train, val, test).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory; default: the run's dataset."
)
_SOURCE = flags.DEFINE_string(
    "source", None, "Dataset source inside --data_dir; default: the run's source."
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Global evaluation batch; default: the run's eval_batch_size."
)
_OUTPUT = flags.DEFINE_string(
    "output",
    None,
    "JSON file for the metrics; default: WORKDIR/eval_SOURCE_SPLIT.json.",
)
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    checkpointing.quiet_orbax_logging()
    trained = inference.load_trained(_WORKDIR.value)
    source = _SOURCE.value or trained.config.data.source
    metrics = inference.evaluate_split(
        trained,
        _SPLIT.value,
        data_dir=_DATA_DIR.value,
        source=source,
        batch_size=_BATCH_SIZE.value,
    )
    result = {
        "split": _SPLIT.value,
        "source": source,
        "data_dir": _DATA_DIR.value or "the training run's",
        "best_step": trained.best_step,
        "metrics": metrics,
    }
    output = pathlib.Path(
        _OUTPUT.value or trained.workdir / f"eval_{source}_{_SPLIT.value}.json"
    )
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(format_metrics_table({_SPLIT.value: metrics}))
    print(f"Metrics written to {output}")


if __name__ == "__main__":
    app.run(main)
