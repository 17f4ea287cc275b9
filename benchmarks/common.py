"""Benchmark helpers: timing statistics, matmul peak, memory, JSON and tables."""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import psutil


def summarize_times(times: Sequence[float]) -> dict[str, float]:
    """Summarize step times in seconds: median, spread and extremes."""
    if not times:
        raise ValueError("no step times to summarize")
    array = np.asarray(times, dtype=np.float64)
    p25, p75 = np.percentile(array, [25, 75])
    return {
        "n": len(array),
        "median": float(np.median(array)),
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
        "p25": float(p25),
        "p75": float(p75),
        # Relative spread: interquartile range over the median.
        "iqr_over_median": float((p75 - p25) / np.median(array)),
    }


def time_call(fn: Callable[[], Any]) -> float:
    """Return the wall time in seconds of `fn()`, which must block until done."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_matmul_peak(
    size: int = 2048, dtype: str = "float32", repeats: int = 10
) -> dict[str, Any]:
    """Measure the FLOP/s of a jitted `size x size` JAX matmul, best of `repeats`.

    The best time, not the median, estimates what the device can reach: a
    matmul this size has no input-dependent work, so slower repeats are
    interference from other processes. Below float32 the products accumulate
    in float32, as the model's matmuls do; XLA's CPU backend runs that about
    twice as fast as a bfloat16 result.
    """
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((size, size), dtype=np.float32), dtype)
    b = jnp.asarray(rng.standard_normal((size, size), dtype=np.float32), dtype)
    matmul = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()
    times = [
        time_call(lambda: matmul(a, b).block_until_ready()) for _ in range(repeats)
    ]
    flops = 2 * size**3
    return {
        "size": size,
        "dtype": dtype,
        "repeats": repeats,
        "best_s": min(times),
        "median_s": statistics.median(times),
        "flops_per_s": flops / min(times),
    }


def host_memory() -> dict[str, int]:
    """Return this process's current resident set size and its peak so far, in bytes."""
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return {
        "rss_bytes": psutil.Process().memory_info().rss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
    }


def device_memory() -> dict[str, Any] | None:
    """Return the first device's `memory_stats()`, or None where the backend has none.

    The CPU backend returns None; GPUs report `bytes_in_use`,
    `peak_bytes_in_use` and `bytes_limit`.
    """
    stats = jax.devices()[0].memory_stats()
    if stats is None:
        return None
    return {key: int(value) for key, value in stats.items()}


def machine_info() -> dict[str, Any]:
    """Describe the machine and the software the figures were measured with."""
    import importlib.metadata

    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "grain"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(device) for device in jax.devices()],
        "python": platform.python_version(),
        "versions": versions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": os.getloadavg(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON, creating the parent folder."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=_to_builtin)
        f.write("\n")


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Format rows as a plain-text table with right-aligned columns."""
    cells = [[_format_cell(value) for value in row] for row in rows]
    widths = [
        max(len(header), *(len(row[i]) for row in cells)) if cells else len(header)
        for i, header in enumerate(headers)
    ]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def _format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.3e}"
    return str(value)
