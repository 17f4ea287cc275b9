r"""Train- and eval-step throughput of FashionMSA in JAX, side by side with PyTorch.

Builds the full model (CLIP towers at a preset's shapes, random weights, the
paper's heads) and times the adapter pre-training step, the fine-tuning step
and the eval step of `fashion_msa.train.steps` on random batches of the input
pipeline's shapes. With `--impl=both` the same steps run on the PyTorch
reference of `benchmarks/torch_reference.py`, eager and under `torch.compile`,
in the same process. Timing rounds alternate between the implementations, so
load from other processes hits all of them alike.

Each (step kind, implementation, text length mode) gets: compile time,
steady-state step time (median and spread over `--steps` steps after
`--warmup`), examples per second, FLOPs per step from XLA's cost analysis,
achieved FLOP/s, and that as a fraction of the dense-matmul peak measured in
this run. Text length modes:

  full      every text padded to 77 tokens, as the PyTorch reference runs:
            the JAX/PyTorch ratio at equal work;
  trimmed   trailing padding cut to a length bucket (exact for CLIP's causal
            text tower): the end-to-end ratio with this saving.

PyTorch always runs at full length.

Run from the repository root:

  python -m benchmarks.step_throughput --preset=vit-b-32 --impl=both \
      --batch_size=16 --output=/tmp/step_throughput.json
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from benchmarks import batches as batch_lib
from benchmarks import common
from benchmarks import jax_steps as jax_steps_lib
from fashion_msa.clip.tokenizer import DEFAULT_LENGTH_BUCKETS
from fashion_msa.model.factory import create_model
from fashion_msa.model.msa import FashionMSA, ModelConfig, init_params
from fashion_msa.train import sharding

STEP_KINDS = ("pretrain", "finetune", "eval")
TEXT_LEN_MODES = ("full", "trimmed")

_PRESET = flags.DEFINE_enum("preset", "vit-b-32", ["tiny", "vit-b-32"], "CLIP shape.")
_IMPL = flags.DEFINE_enum(
    "impl", "jax", ["jax", "torch", "both"], "Implementations to time."
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "Tower compute dtype. bfloat16 keeps float32 parameters and optimizer state.",
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Posts per step.")
_STEPS = flags.DEFINE_integer(
    "steps", 6, "Timed steps per step kind and implementation."
)
_WARMUP = flags.DEFINE_integer(
    "warmup", 1, "Untimed steps after compilation, per step kind and implementation."
)
_ROUNDS = flags.DEFINE_integer(
    "rounds", 3, "Timing rounds the steps are split into, alternating implementations."
)
_STEP_KINDS = flags.DEFINE_list(
    "step_kinds", list(STEP_KINDS), "Steps to time: pretrain, finetune, eval."
)
_TEXT_LEN = flags.DEFINE_list(
    "text_len",
    list(TEXT_LEN_MODES),
    "JAX text length modes: full (padded to 77) and/or trimmed (length buckets).",
)
_LENGTH_BUCKETS = flags.DEFINE_list(
    "length_buckets",
    [str(b) for b in DEFAULT_LENGTH_BUCKETS],
    "Text lengths that trimmed batches are cut to.",
)
_TEXT_LENGTHS = flags.DEFINE_enum(
    "text_lengths",
    "auto",
    ["auto", "mvsa", "fixed"],
    "Where text lengths come from: the MVSA-Single tweets (--mvsa_dir), a fixed "
    "log-normal fit to them, or auto (MVSA when the folder exists).",
)
_MVSA_DIR = flags.DEFINE_string(
    "mvsa_dir",
    str(pathlib.Path(__file__).resolve().parents[2] / "shared/data/mvsa_single"),
    "MVSA-Single folder whose tweet lengths the text rows take.",
)
_NUM_BATCHES = flags.DEFINE_integer(
    "num_batches", 4, "Distinct random batches that the timed steps cycle through."
)
_SCAN_LAYERS = flags.DEFINE_bool(
    "scan_layers", True, "Scan the CLIP layers with nn.scan (shorter compilation)."
)
_TORCH_COMPILE = flags.DEFINE_bool(
    "torch_compile", True, "Also time the PyTorch steps under torch.compile."
)
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "torch.set_num_threads value; 0 keeps PyTorch's default."
)
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the peak matmul.")
_MATMUL_REPEATS = flags.DEFINE_integer(
    "matmul_repeats", 10, "Repeats of the peak matmul, at the start and the end."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seeds weights, batches and dropout.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON file for the results; '' = none.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir",
    "",
    "Write a jax.profiler trace of two steps of each JAX variant here.",
)


@dataclasses.dataclass
class Variant:
    """One implementation of one step kind, with its compile function and timings.

    Attributes:
      name: e.g. "jax/full", "torch_eager".
      impl: "jax" or "torch".
      text_len: "full" or "trimmed".
      step_kind: "pretrain", "finetune" or "eval".
      compile: compiles (or runs the first step) and returns timing details.
      run: runs step `index` to completion.
      flops_per_batch: XLA FLOPs of each batch's step, by batch index.
      text_lengths: text columns of each batch, by batch index.
    """

    name: str
    impl: str
    text_len: str
    step_kind: str
    compile: Callable[[], dict[str, Any]]
    run: Callable[[int], None]
    flops_per_batch: list[float]
    text_lengths: list[int]
    compile_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    times: list[float] = dataclasses.field(default_factory=list)
    batch_indices: list[int] = dataclasses.field(default_factory=list)
    host_memory: dict[str, int] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def jax_variants(
    step_kind: str,
    model: FashionMSA,
    params: Any,
    mesh: jax.sharding.Mesh,
    host_batches: dict[str, list[dict[str, np.ndarray]]],
    flops: dict[str, list[float]],
) -> list[Variant]:
    """Build the JAX variants ("full", "trimmed") of one step kind on a shared state."""
    jax_steps = jax_steps_lib.JaxSteps(step_kind, model, params, mesh, _SEED.value)
    variants = []
    for text_len, batches in host_batches.items():
        device_batches = [sharding.shard_batch(batch, mesh) for batch in batches]
        executables: dict[int, Any] = {}
        lengths = [batch_lib.text_length(batch) for batch in batches]

        def compile_all(
            device_batches: list[dict[str, jax.Array]] = device_batches,
            lengths: list[int] = lengths,
            executables: dict[int, Any] = executables,
        ) -> dict[str, Any]:
            per_length = {}
            for batch, length in zip(device_batches, lengths, strict=True):
                if length in executables:
                    continue
                logging.info(
                    "Compiling the JAX %s step at %d tokens", step_kind, length
                )
                executables[length], lower_s, compile_s = jax_steps.compile(batch)
                per_length[length] = {
                    "lower_s": lower_s,
                    "compile_s": compile_s,
                    "xla_memory": xla_memory(executables[length]),
                }
                logging.info(
                    "Lowered in %.1f s, compiled in %.1f s", lower_s, compile_s
                )
            # A length another variant compiled already comes from JAX's cache,
            # so "compile_s" is what this variant adds: all its lengths together.
            return {
                "compile_s": sum(
                    t["lower_s"] + t["compile_s"] for t in per_length.values()
                ),
                "compile_s_per_text_length": per_length,
                "xla_memory": per_length[lengths[0]]["xla_memory"],
            }

        def run(
            index: int,
            device_batches: list[dict[str, jax.Array]] = device_batches,
            lengths: list[int] = lengths,
            executables: dict[int, Any] = executables,
        ) -> None:
            index %= len(device_batches)
            jax_steps.run(executables[lengths[index]], device_batches[index])

        variants.append(
            Variant(
                name=f"jax/{text_len}",
                impl="jax",
                text_len=text_len,
                step_kind=step_kind,
                compile=compile_all,
                run=run,
                flops_per_batch=flops[text_len],
                text_lengths=lengths,
            )
        )
    return variants


def xla_memory(compiled: Any) -> dict[str, int] | None:
    """Return XLA's buffer sizes for an executable, in bytes, where it reports them.

    On CPU, where `device.memory_stats()` is None, this is the device-side
    figure: arguments, outputs, temporaries, and outputs that reuse donated
    arguments (`alias`).
    """
    try:
        analysis = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    if analysis is None:
        return None
    fields = ("argument", "output", "alias", "temp", "generated_code")
    return {
        f"{name}_bytes": int(getattr(analysis, f"{name}_size_in_bytes"))
        for name in fields
    }


def torch_variants(
    step_kind: str,
    torch_model: Any,
    host_batches: list[dict[str, np.ndarray]],
    flops: list[float],
) -> list[Variant]:
    """Build the PyTorch variants (eager and compiled) of one step kind."""
    from benchmarks import torch_reference

    torch_batches = [torch_reference.to_torch_batch(batch) for batch in host_batches]
    step_fns = torch_reference.make_steps(torch_model, step_kind, seed=_SEED.value)
    counted = torch_reference.count_flops(step_fns["eager"], torch_batches[0])
    modes = ["eager", "compile"] if _TORCH_COMPILE.value else ["eager"]
    variants = []
    for mode in modes:
        step_fn = step_fns[mode]

        def first_step(step_fn: Callable[..., Any] = step_fn) -> dict[str, Any]:
            # PyTorch compiles inside the first call, which also runs the step.
            seconds = common.time_call(lambda: step_fn(torch_batches[0]))
            return {"compile_s": seconds, "first_step_s": seconds}

        def run(index: int, step_fn: Callable[..., Any] = step_fn) -> None:
            step_fn(torch_batches[index % len(torch_batches)])

        variant = Variant(
            name=f"torch_{mode}",
            impl="torch",
            text_len="full",
            step_kind=step_kind,
            compile=first_step,
            run=run,
            flops_per_batch=flops,
            text_lengths=[batch_lib.text_length(b) for b in host_batches],
        )
        variant.extra["torch_counted_flops_per_step"] = counted
        variants.append(variant)
    return variants


def time_variants(variants: list[Variant], steps_count: int, warmup: int) -> None:
    """Compile, warm up and time every variant, alternating them round by round."""
    for variant in variants:
        variant.compile_info = variant.compile()
        logging.info(
            "%s %s: compiled in %.1f s",
            variant.step_kind,
            variant.name,
            variant.compile_info["compile_s"],
        )
    next_index = {variant.name: 1 for variant in variants}
    for variant in variants:
        for _ in range(warmup):
            variant.run(next_index[variant.name])
            next_index[variant.name] += 1

    rounds = max(1, min(_ROUNDS.value, steps_count))
    per_round = math.ceil(steps_count / rounds)
    for round_index in range(rounds):
        # Reversing the order every other round evens out position effects.
        order = variants if round_index % 2 == 0 else variants[::-1]
        for variant in order:
            for _ in range(per_round):
                if len(variant.times) >= steps_count:
                    break
                index = next_index[variant.name]
                seconds = common.time_call(lambda v=variant, i=index: v.run(i))
                variant.times.append(seconds)
                variant.batch_indices.append(index % len(variant.text_lengths))
                next_index[variant.name] += 1
            variant.host_memory = common.host_memory()
        logging.info(
            "%s round %d/%d: %s",
            variants[0].step_kind,
            round_index + 1,
            rounds,
            ", ".join(
                f"{v.name} {np.median(v.times):.3f} s" for v in variants if v.times
            ),
        )


def summarize(variant: Variant, batch_size: int) -> dict[str, Any]:
    """Return the JSON record of a timed variant."""
    times = common.summarize_times(variant.times)
    flops = float(np.mean([variant.flops_per_batch[i] for i in variant.batch_indices]))
    achieved = flops / times["median"]
    record = {
        "step_kind": variant.step_kind,
        "name": variant.name,
        "impl": variant.impl,
        "text_len": variant.text_len,
        **variant.compile_info,
        "step_time_s": times,
        "step_times_s": variant.times,
        "examples_per_s": batch_size / times["median"],
        "flops_per_step": flops,
        "flops_per_example": flops / batch_size,
        "flops_source": "xla_cost_analysis",
        "achieved_flops_per_s": achieved,
        "text_lengths_timed": [variant.text_lengths[i] for i in variant.batch_indices],
        "host_memory": variant.host_memory,
        **variant.extra,
    }
    return record


def compute_ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return JAX/PyTorch examples-per-second ratios for every step kind."""
    ratios = []
    for jax_record in records:
        if jax_record["impl"] != "jax":
            continue
        for torch_record in records:
            if (
                torch_record["impl"] != "torch"
                or torch_record["step_kind"] != jax_record["step_kind"]
            ):
                continue
            ratios.append(
                {
                    "step_kind": jax_record["step_kind"],
                    "jax": jax_record["name"],
                    "torch": torch_record["name"],
                    "kind": "equal_work"
                    if jax_record["text_len"] == "full"
                    else "end_to_end",
                    "ratio": jax_record["examples_per_s"]
                    / torch_record["examples_per_s"],
                }
            )
    return ratios


def print_tables(result: dict[str, Any]) -> None:
    """Print the results and the ratios as plain-text tables."""
    peak_dtype = _DTYPE.value
    rows = []
    for r in result["results"]:
        rows.append(
            [
                r["step_kind"],
                r["name"],
                r["compile_s"],
                r["step_time_s"]["median"],
                r["step_time_s"]["iqr_over_median"],
                r["examples_per_s"],
                r["flops_per_step"] / 1e9,
                r["achieved_flops_per_s"] / 1e9,
                100 * r["fraction_of_matmul_peak"][peak_dtype],
                r["host_memory"]["rss_bytes"] / 2**30,
            ]
        )
    headers = [
        "step",
        "variant",
        "compile_s",
        "median_s",
        "iqr/med",
        "ex/s",
        "GFLOP/step",
        "GFLOP/s",
        f"%peak_{peak_dtype}",
        "rss_GiB",
    ]
    print(common.format_table(headers, rows))
    peaks = ", ".join(
        f"{dtype} {peak['flops_per_s'] / 1e9:.1f} GFLOP/s"
        for dtype, peak in result["matmul_peak"].items()
    )
    print(f"matmul peak ({_MATMUL_SIZE.value}^2, best of runs): {peaks}")
    if result["ratios"]:
        print()
        print(
            common.format_table(
                ["step", "jax", "torch", "kind", "jax/torch ex/s"],
                [
                    [r["step_kind"], r["jax"], r["torch"], r["kind"], r["ratio"]]
                    for r in result["ratios"]
                ],
            )
        )


def make_host_batches(
    sampler: batch_lib.LengthSampler, config: Any, text_len_modes: Sequence[str]
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Draw `--num_batches` random batches; return them per text length mode."""
    rng = np.random.default_rng(_SEED.value)
    full = [
        batch_lib.random_batch(rng, config, _BATCH_SIZE.value, sampler)
        for _ in range(_NUM_BATCHES.value)
    ]
    buckets = [int(b) for b in _LENGTH_BUCKETS.value]
    result = {"full": full}
    if "trimmed" in text_len_modes:
        result["trimmed"] = [batch_lib.trim_text_padding(b, buckets) for b in full]
    return result


def length_sampler(max_length: int) -> batch_lib.LengthSampler:
    """Return the text length sampler chosen by --text_lengths."""
    mvsa_dir = pathlib.Path(_MVSA_DIR.value)
    available = (mvsa_dir / "labelResultAll.txt").is_file()
    choice = _TEXT_LENGTHS.value
    if choice == "mvsa" and not available:
        raise app.UsageError(
            f"--text_lengths=mvsa but no MVSA-Single folder at {mvsa_dir}; set "
            "--mvsa_dir or use --text_lengths=fixed"
        )
    if choice == "fixed" or (choice == "auto" and not available):
        return batch_lib.LengthSampler(None, max_length)
    return batch_lib.LengthSampler(batch_lib.mvsa_text_lengths(mvsa_dir), max_length)


def check_flags() -> tuple[list[str], list[str]]:
    """Validate the list flags; return (step kinds, JAX text length modes)."""
    step_kinds = [k for k in STEP_KINDS if k in _STEP_KINDS.value]
    unknown = set(_STEP_KINDS.value) - set(STEP_KINDS)
    if unknown or not step_kinds:
        raise app.UsageError(
            f"--step_kinds must name some of {STEP_KINDS}, got {_STEP_KINDS.value}"
        )
    modes = [m for m in TEXT_LEN_MODES if m in _TEXT_LEN.value]
    if set(_TEXT_LEN.value) - set(TEXT_LEN_MODES) or not modes:
        raise app.UsageError(
            f"--text_len must name some of {TEXT_LEN_MODES}, got {_TEXT_LEN.value}"
        )
    for name, value in (("steps", _STEPS.value), ("batch_size", _BATCH_SIZE.value)):
        if value < 1:
            raise app.UsageError(f"--{name} must be at least 1, got {value}")
    if _NUM_BATCHES.value < 1 or _WARMUP.value < 0:
        raise app.UsageError("--num_batches must be >= 1 and --warmup >= 0")
    return step_kinds, modes


def measure_peaks(dtypes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Measure the matmul peak of each dtype."""
    return {
        dtype: common.measure_matmul_peak(
            _MATMUL_SIZE.value, dtype, _MATMUL_REPEATS.value
        )
        for dtype in dtypes
    }


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    step_kinds, text_len_modes = check_flags()
    use_jax = _IMPL.value in ("jax", "both")
    use_torch = _IMPL.value in ("torch", "both")
    machine = common.machine_info()
    logging.info("Load average before the run: %s", machine["load_average"])

    peak_dtypes = sorted({"float32", _DTYPE.value})
    peaks_before = measure_peaks(peak_dtypes)

    model_config = jax_steps_lib.build_model_config(
        _PRESET.value, _DTYPE.value, _SCAN_LAYERS.value
    )
    model = create_model(model_config)
    clip_config = model.clip_config
    mesh = sharding.create_mesh()
    sampler = length_sampler(clip_config.text.max_position_embeddings)
    host_batches = make_host_batches(
        sampler, clip_config, text_len_modes if use_jax else ["full"]
    )
    logging.info(
        "Text lengths from %s; trimmed batch lengths %s",
        sampler.source,
        [batch_lib.text_length(b) for b in host_batches.get("trimmed", [])],
    )

    params = init_params(model, jax.random.key(_SEED.value))
    torch_model = None
    if use_torch:
        torch_model = _build_torch_model(clip_config, model_config)

    records = []
    for step_kind in step_kinds:
        flops = {
            mode: [_cached_flops(step_kind, model, mesh, batch) for batch in batches]
            for mode, batches in host_batches.items()
        }
        variants: list[Variant] = []
        if use_jax:
            variants += jax_variants(
                step_kind,
                model,
                params,
                mesh,
                {m: host_batches[m] for m in text_len_modes},
                flops,
            )
        if use_torch:
            variants += torch_variants(
                step_kind, torch_model, host_batches["full"], flops["full"]
            )
        time_variants(variants, _STEPS.value, _WARMUP.value)
        if _PROFILE_DIR.value and use_jax:
            _profile(variants, step_kind)
        records += [summarize(v, _BATCH_SIZE.value) for v in variants]
        del variants
        gc.collect()

    peaks_after = measure_peaks(peak_dtypes)
    peaks = {
        dtype: max(
            peaks_before[dtype], peaks_after[dtype], key=lambda p: p["flops_per_s"]
        )
        for dtype in peak_dtypes
    }
    for record in records:
        record["fraction_of_matmul_peak"] = {
            dtype: record["achieved_flops_per_s"] / peak["flops_per_s"]
            for dtype, peak in peaks.items()
        }

    result = {
        "benchmark": "step_throughput",
        "config": {
            "preset": _PRESET.value,
            "impl": _IMPL.value,
            "dtype": _DTYPE.value,
            "batch_size": _BATCH_SIZE.value,
            "steps": _STEPS.value,
            "warmup": _WARMUP.value,
            "rounds": _ROUNDS.value,
            "step_kinds": step_kinds,
            "text_len": text_len_modes,
            "length_buckets": [int(b) for b in _LENGTH_BUCKETS.value],
            "text_lengths_source": sampler.source,
            "num_batches": _NUM_BATCHES.value,
            "scan_layers": _SCAN_LAYERS.value,
            "torch_compile": _TORCH_COMPILE.value,
            "seed": _SEED.value,
        },
        "machine": machine,
        "matmul_peak": peaks,
        "matmul_peak_runs": {"before": peaks_before, "after": peaks_after},
        "results": records,
        "ratios": compute_ratios(records),
        "host_memory": common.host_memory(),
        "device_memory": common.device_memory(),
        "load_average_after": os.getloadavg(),
    }
    if use_torch:
        import torch

        result["machine"]["torch_threads"] = torch.get_num_threads()
    print_tables(result)
    if _OUTPUT.value:
        common.write_json(_OUTPUT.value, result)
        logging.info("Wrote %s", _OUTPUT.value)


_FLOPS_CACHE: dict[tuple[str, int], float] = {}


def _cached_flops(
    step_kind: str,
    model: FashionMSA,
    mesh: jax.sharding.Mesh,
    batch: dict[str, np.ndarray],
) -> float:
    # FLOPs depend on the shapes only, so batches of one text length share a count.
    key = (step_kind, batch_lib.text_length(batch))
    if key not in _FLOPS_CACHE:
        _FLOPS_CACHE[key] = jax_steps_lib.count_step_flops(
            step_kind, model, mesh, batch
        )
    return _FLOPS_CACHE[key]


def _build_torch_model(clip_config: Any, model_config: Any) -> Any:
    import torch

    from benchmarks import torch_reference

    if _TORCH_THREADS.value:
        torch.set_num_threads(_TORCH_THREADS.value)
    torch.manual_seed(_SEED.value)
    autocast = torch.bfloat16 if _DTYPE.value == "bfloat16" else None
    return torch_reference.TorchFashionMSA(
        clip_config, ModelConfig.from_config(model_config), autocast_dtype=autocast
    )


def _profile(variants: list[Variant], step_kind: str) -> None:
    directory = pathlib.Path(_PROFILE_DIR.value) / step_kind
    with jax.profiler.trace(str(directory)):
        for variant in variants:
            if variant.impl == "jax":
                with jax.profiler.TraceAnnotation(variant.name):
                    for index in range(2):
                        variant.run(index)
    logging.info("Wrote a profile of the JAX %s steps to %s", step_kind, directory)


if __name__ == "__main__":
    app.run(main)
