"""Append-only JSONL logs that survive a killed process: whole lines, synced to disk.

Every record is one JSON object on one line, written with a single `os.write` on a
file opened with O_APPEND and followed by `os.fsync`, so a killed process leaves
either the whole line or nothing of it. A torn last line can still come from an
older crash (a power loss, or a writer that did not follow these rules): readers
ignore it with a warning, and the next writer cuts it off before appending.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Iterator
from typing import Any

from absl import logging


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the records of a JSONL log, skipping unreadable lines with a warning.

    A missing file reads as no records. A last line without its newline is kept
    when it parses as a whole JSON object; otherwise it is a torn line and ignored.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    records = []
    for number, line, complete in _lines(path.read_bytes()):
        record = _parse_line(line)
        if record is not None:
            records.append(record)
        elif not complete:
            logging.warning(
                "Ignoring the torn last line of %s (%d bytes without a newline), "
                "left by an interrupted write",
                path,
                len(line),
            )
        else:
            logging.warning("Skipping unreadable line %d of %s", number, path)
    return records


def _lines(data: bytes) -> Iterator[tuple[int, bytes, bool]]:
    """Yield (line number, line without newline, ended by a newline) per line."""
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):
        if line.strip():
            yield number, line, True
    if lines[-1].strip():
        yield len(lines), lines[-1], False


def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


class JsonlLog:
    """An append-only JSONL file; `append` returns once the line is on disk.

    Opening repairs the end of the file: a torn last line is cut off (with a
    warning), and a whole last record without its newline gets one, so appended
    records always start on a fresh line.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_end()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _repair_end(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        with open(self.path, "r+b") as handle:
            if _parse_line(tail) is not None:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            else:
                logging.warning(
                    "Cutting a torn last line (%d bytes) off %s before appending",
                    len(tail),
                    self.path,
                )
                handle.truncate(cut)
            handle.flush()
            os.fsync(handle.fileno())

    def append(self, record: dict[str, Any]) -> None:
        """Write `record` as one line and sync it to disk."""
        record = {**record, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fd, line)
        if written != len(line):
            # A short write to a regular file means the disk is full or failing.
            raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
