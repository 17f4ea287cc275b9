"""Orbax checkpoints of a run: latest train states to resume from, and the best params.

Two `orbax.checkpoint.CheckpointManager`s live in the workdir:

  checkpoints/  the full train state (parameters, optimizer state, stage step)
                plus a JSON `progress` record (stage, global step, input
                iterator state, seed). A save happens every
                `checkpoint_every_steps` and at the end of each stage, and the
                newest `max_to_keep` are kept.
  best/         the parameters with the highest validation macro-F1, with
                their validation metrics; orbax keeps only the best one.

Checkpoint step numbers are global steps: pre-training steps first, then
fine-tuning steps, so the two stages never collide.
"""

import logging as std_logging
import pathlib
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

BEST_METRIC = "val_macro_f1"


class _OrbaxInfoFilter(std_logging.Filter):
    """Drop orbax's INFO records (a dozen lines per save); keep its warnings."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or (
            "/orbax/" not in record.pathname.replace("\\", "/")
        )


def quiet_orbax_logging() -> None:
    """Hide orbax's per-save INFO logs in this process (warnings still show)."""
    logger = std_logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxInfoFilter) for f in logger.filters):
        logger.addFilter(_OrbaxInfoFilter())


class RunCheckpoints:
    """The latest-state and best-parameter checkpoint managers of a workdir."""

    def __init__(
        self,
        workdir: str | pathlib.Path,
        max_to_keep: int = 2,
        async_save: bool = True,
        read_only: bool = False,
    ) -> None:
        workdir = pathlib.Path(workdir).absolute()
        self.latest = ocp.CheckpointManager(
            workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                create=not read_only,
                # A run killed during a save leaves a temporary folder behind.
                cleanup_tmp_directories=not read_only,
                read_only=read_only,
            ),
            item_names=("state", "progress"),
        )
        self.best = ocp.CheckpointManager(
            workdir / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                best_fn=lambda metrics: metrics[BEST_METRIC],
                best_mode="max",
                enable_async_checkpointing=async_save,
                create=not read_only,
                cleanup_tmp_directories=not read_only,
                read_only=read_only,
            ),
            item_names=("params", "validation"),
        )

    # Latest train state.

    def latest_step(self) -> int | None:
        """Return the global step of the newest complete state checkpoint, if any."""
        return self.latest.latest_step()

    def save_state(self, step: int, state: Any, progress: Mapping[str, Any]) -> None:
        """Save the train state and its JSON progress record at global `step`."""
        self.latest.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                progress=ocp.args.JsonSave(dict(progress)),
            ),
            force=True,
        )
        logging.info("Saving checkpoint at global step %d", step)

    def restore_progress(self, step: int) -> dict[str, Any]:
        """Read only the JSON progress record of a checkpoint."""
        restored = self.latest.restore(
            step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())
        )
        return dict(restored["progress"])

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Restore the train state of a checkpoint into the structure and shardings
        of `abstract_state` (from `jax.eval_shape` or a freshly created state)."""
        restored = self.latest.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)),
        )
        return restored["state"]

    # Best parameters.

    def save_best(self, step: int, params: Any, metrics: Mapping[str, Any]) -> None:
        """Offer `params` as best; orbax keeps them only if `metrics` rank highest.

        `metrics` must contain BEST_METRIC; every value must be JSON-serialisable.
        """
        self.best.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                validation=ocp.args.JsonSave(dict(metrics)),
            ),
            metrics={BEST_METRIC: float(metrics[BEST_METRIC])},
            force=True,
        )

    def best_step(self) -> int | None:
        """Return the global step of the best checkpoint, if one was saved."""
        return self.best.best_step()

    def restore_best(self, abstract_params: Any) -> tuple[int, Any, dict[str, Any]]:
        """Restore the best parameters, returning (step, params, validation metrics).

        Raises:
          FileNotFoundError: no best checkpoint exists yet.
        """
        step = self.best_step()
        if step is None:
            raise FileNotFoundError(
                f"no best checkpoint in {self.best.directory}; train with "
                "launch.train first, which saves one after each validation"
            )
        restored = self.best.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                validation=ocp.args.JsonRestore(),
            ),
        )
        return step, restored["params"], dict(restored["validation"])

    def wait_until_finished(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the managers."""
        self.latest.close()
        self.best.close()
