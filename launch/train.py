r"""Train and evaluate the sentiment model: build data, pre-train, fine-tune, test.

  python -m launch.train --config=configs/demo.py --workdir=/tmp/fashion_msa_demo

Config values can be overridden, e.g. `--config.train.batch_size=8`, and an
ablation picked with `--config=configs/demo.py:text_only`. Running the same
command again in the same workdir resumes after a crash. For a multi-host run,
start one process per host with --coordinator_address, --num_processes and
--process_id.
"""

from absl import app, flags
from ml_collections import config_flags

from fashion_msa.train import checkpointing, sharding, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for the dataset, checkpoints, metrics and results."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0's coordinator."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-host: number of processes (one per host)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-host: index of this process, from 0."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    checkpointing.quiet_orbax_logging()
    sharding.initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
