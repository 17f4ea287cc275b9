"""Metric logging to a JSON Lines file and to TensorBoard event files (tensorboardX).

`metrics.jsonl` gets one object a record: {"step", "stage", "split", ...scalars}.
When a run resumes from a checkpoint, `truncate_after(step)` drops the records
written after that checkpoint, so the file describes the resumed run exactly
once. TensorBoard files cannot be rewritten, so after a resume they hold the
repeated steps twice, and TensorBoard shows the later values.
"""

import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import tensorboardX

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_records(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """Read all records of a workdir's metrics file (empty list when absent)."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _json_number(value: float) -> float | None:
    """JSON has no NaN or infinity; record them as null."""
    return value if math.isfinite(value) else None


class MetricWriter:
    """Append scalar metrics to `metrics.jsonl` and TensorBoard in a workdir.

    Only process 0 writes; on other processes every method does nothing.
    """

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True) -> None:
        self.workdir = pathlib.Path(workdir)
        self.enabled = enabled
        self._tensorboard: tensorboardX.SummaryWriter | None = None
        if enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._tensorboard = tensorboardX.SummaryWriter(
                str(self.workdir / TENSORBOARD_DIR)
            )

    def truncate_after(self, step: int) -> None:
        """Drop JSONL records with a step greater than `step` (used on resume)."""
        if not self.enabled:
            return
        records = [r for r in read_records(self.workdir) if r["step"] <= step]
        path = self.workdir / METRICS_FILE
        with open(path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")

    def write(
        self, step: int, stage: str, split: str, scalars: Mapping[str, float]
    ) -> None:
        """Record scalars of `split` ("train", "val", ...) at a global step."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        record = {"step": int(step), "stage": stage, "split": split}
        record.update({k: _json_number(v) for k, v in values.items()})
        with open(self.workdir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        assert self._tensorboard is not None
        for name, value in values.items():
            self._tensorboard.add_scalar(f"{stage}/{split}/{name}", value, step)

    def flush(self) -> None:
        """Write buffered TensorBoard events to disk."""
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
