"""Smoke tests of the benchmarks and checks of their PyTorch reference."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

# `python -m pytest` puts the repository root on sys.path; the pytest script
# does not, and the benchmarks are a folder of scripts, not an installed package.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import batches as batch_lib  # noqa: E402
from benchmarks import jax_steps, torch_reference  # noqa: E402
from fashion_msa.clip.config import get_preset  # noqa: E402
from fashion_msa.model import msa  # noqa: E402
from fashion_msa.train import sharding  # noqa: E402

# One layer per tower and 32-pixel images keep the in-process checks fast.
_TINY = get_preset("tiny")
SMALL_CLIP = dataclasses.replace(
    _TINY,
    text=dataclasses.replace(_TINY.text, hidden_size=32, num_hidden_layers=1),
    vision=dataclasses.replace(
        _TINY.vision, hidden_size=32, num_hidden_layers=1, image_size=32
    ),
    projection_dim=32,
)
SMALL_HEADS = msa.ModelConfig(hidden_dim=48, adapter_hidden_dim=40)

STEP_FIELDS = (
    "step_kind",
    "name",
    "impl",
    "text_len",
    "compile_s",
    "step_time_s",
    "step_times_s",
    "examples_per_s",
    "flops_per_step",
    "flops_per_example",
    "achieved_flops_per_s",
    "fraction_of_matmul_peak",
    "text_lengths_timed",
    "host_memory",
)


def _run_benchmark(module: str, *args: str, timeout: int = 240) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def step_json(tmp_path_factory):
    """Run step_throughput at the tiny preset, JAX and eager PyTorch, two steps each."""
    path = tmp_path_factory.mktemp("step_throughput") / "result.json"
    _run_benchmark(
        "benchmarks.step_throughput",
        "--preset=tiny",
        "--impl=both",
        "--notorch_compile",
        "--step_kinds=finetune,eval",
        "--batch_size=4",
        "--steps=2",
        "--warmup=0",
        "--rounds=2",
        "--num_batches=2",
        "--text_lengths=fixed",
        "--length_buckets=32,48,77",
        "--matmul_size=256",
        "--matmul_repeats=2",
        f"--output={path}",
    )
    return path


def test_step_throughput_records(step_json):
    result = json.loads(step_json.read_text())
    records = {(r["step_kind"], r["name"]): r for r in result["results"]}
    expected = {
        (kind, name)
        for kind in ("finetune", "eval")
        for name in ("jax/full", "jax/trimmed", "torch_eager")
    }
    assert set(records) == expected
    for key, record in records.items():
        missing = [field for field in STEP_FIELDS if field not in record]
        assert not missing, f"{key} lacks {missing}"
        assert record["compile_s"] > 0, key
        assert record["step_time_s"]["n"] == 2, key
        assert record["step_time_s"]["median"] > 0, key
        assert record["examples_per_s"] == pytest.approx(
            4 / record["step_time_s"]["median"]
        )
        assert record["flops_per_step"] > 0, key
        assert record["achieved_flops_per_s"] > 0, key
        assert record["fraction_of_matmul_peak"]["float32"] > 0, key
        assert record["host_memory"]["rss_bytes"] > 0, key


def test_step_throughput_text_lengths(step_json):
    result = json.loads(step_json.read_text())
    for record in result["results"]:
        lengths = record["text_lengths_timed"]
        if record["text_len"] == "full":
            assert set(lengths) == {77}, record["name"]
        else:
            assert set(lengths) <= {32, 48, 77}, record["name"]


def test_step_throughput_equal_work_flops(step_json):
    result = json.loads(step_json.read_text())
    records = {(r["step_kind"], r["name"]): r for r in result["results"]}
    for kind in ("finetune", "eval"):
        jax_full = records[(kind, "jax/full")]
        torch_eager = records[(kind, "torch_eager")]
        # PyTorch runs the full-length batch, so both share XLA's count.
        assert torch_eager["flops_per_step"] == jax_full["flops_per_step"]
        # PyTorch's counter counts only matmuls, convolutions and attention.
        # XLA also counts elementwise work, so XLA's count is the larger.
        counted = torch_eager["torch_counted_flops_per_step"]
        assert 0 < counted <= jax_full["flops_per_step"]
        trimmed = records[(kind, "jax/trimmed")]
        assert trimmed["flops_per_step"] <= jax_full["flops_per_step"]


def test_step_throughput_memory_and_machine(step_json):
    result = json.loads(step_json.read_text())
    jax_record = next(r for r in result["results"] if r["name"] == "jax/full")
    memory = jax_record["xla_memory"]
    assert memory["argument_bytes"] > 0
    assert memory["temp_bytes"] >= 0
    assert result["host_memory"]["peak_rss_bytes"] >= result["host_memory"]["rss_bytes"]
    assert result["matmul_peak"]["float32"]["flops_per_s"] > 0
    assert result["machine"]["cpu_count"] >= 1
    assert result["machine"]["versions"]["jax"] == jax.__version__


def test_step_throughput_ratios(step_json):
    result = json.loads(step_json.read_text())
    ratios = {(r["step_kind"], r["jax"], r["torch"]): r for r in result["ratios"]}
    assert set(ratios) == {
        (kind, jax_name, "torch_eager")
        for kind in ("finetune", "eval")
        for jax_name in ("jax/full", "jax/trimmed")
    }
    for (kind, jax_name, _), ratio in ratios.items():
        assert ratio["ratio"] > 0
        expected_kind = "equal_work" if jax_name == "jax/full" else "end_to_end"
        assert ratio["kind"] == expected_kind, (kind, jax_name)


def test_input_pipeline_records(step_json, tmp_path):
    output = tmp_path / "input_pipeline.json"
    _run_benchmark(
        "benchmarks.input_pipeline",
        "--datasets=synthetic",
        "--presets=tiny",
        "--workers=0,1",
        "--batch_size=4",
        "--batches=2",
        "--warmup_batches=1",
        "--synthetic_posts=24",
        "--synthetic_image_size=64",
        f"--data_dir={tmp_path / 'data'}",
        f"--synthetic_dir={tmp_path / 'synthetic'}",
        f"--step_json={step_json}",
        f"--output={output}",
    )
    result = json.loads(output.read_text())
    step_rate = result["step_rates"]["tiny"]
    assert step_rate["source"] == str(step_json)
    assert step_rate["variant"] in ("jax/full", "jax/trimmed")
    assert [r["workers"] for r in result["results"]] == [0, 1]
    for record in result["results"]:
        assert record["dataset"] == "synthetic"
        assert record["image_size"] == 64
        assert record["posts_per_s"] > 0
        assert record["first_batch_s"] > 0
        assert 0 <= record["has_pseudo_fraction"] <= 1
        assert record["loader_over_step"] == pytest.approx(
            record["posts_per_s"] / step_rate["examples_per_s"]
        )
        assert record["meets_goal"] == (record["loader_over_step"] >= 3.0)
    assert result["builds"]["synthetic"]["built_now"]


def test_frozen_towers_records(tmp_path):
    output = tmp_path / "frozen_towers.json"
    _run_benchmark(
        "benchmarks.frozen_towers",
        "--preset=tiny",
        "--batch_size=4",
        "--num_posts=40",
        "--trainable_steps=2",
        "--encode_batches=2",
        "--frozen_epochs=2",
        "--run_epochs=1,5",
        f"--output={output}",
    )

    result = json.loads(output.read_text())
    assert result["steps_per_epoch"] == 10
    trainable, frozen = result["trainable"], result["frozen"]
    assert trainable["epoch_time_s_estimate"] == pytest.approx(
        trainable["step_time_s"]["median"] * 10
    )
    assert frozen["epoch_time_s"]["n"] == 2
    assert np.isfinite(frozen["final_loss"])
    assert result["encoding"]["train_split_s"] == pytest.approx(
        40 / result["encoding"]["posts_per_s"]
    )

    speedup = result["speedup"]
    assert speedup["per_epoch"] == pytest.approx(
        trainable["epoch_time_s_estimate"] / frozen["epoch_time_s"]["median"]
    )
    assert set(speedup) == {
        "per_epoch",
        "run_of_1_epochs_with_encoding",
        "run_of_5_epochs_with_encoding",
    }
    # Charging the encoding once favours longer runs.
    assert (
        speedup["run_of_1_epochs_with_encoding"]
        < speedup["run_of_5_epochs_with_encoding"]
        < speedup["per_epoch"]
    )


def _small_batch(seed: int = 0, batch_size: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = batch_lib.random_batch(
        rng, SMALL_CLIP, batch_size, batch_lib.LengthSampler(None)
    )
    batch["has_pseudo"] = np.array([True, False] * (batch_size // 2))
    return batch


@pytest.fixture(scope="module")
def small_models():
    """The Flax model with random parameters and the PyTorch reference holding them."""
    model = msa.FashionMSA(SMALL_CLIP, SMALL_HEADS)
    params = msa.init_params(model, jax.random.key(0))
    torch_model = torch_reference.TorchFashionMSA(SMALL_CLIP, SMALL_HEADS)
    torch_reference.load_flax_params(torch_model, params)
    return model, params, torch_model


def test_torch_reference_matches_flax(small_models):
    model, params, torch_model = small_models
    batch = _small_batch()
    with jax.default_matmul_precision("highest"):
        expected = model.apply({"params": params}, batch)
    torch_model.eval()
    with torch.no_grad():
        actual = torch_model(torch_reference.to_torch_batch(batch))
    # float32 on both sides with full-precision matmuls: only the summation
    # order differs, a few ulps of values of size ~1.
    for key in ("logits", "sim", "consistency_logit", "text_embeds", "image_embeds"):
        np.testing.assert_allclose(
            actual[key].numpy(), np.asarray(expected[key]), rtol=0, atol=1e-5
        )


def test_torch_reference_consistency_matches_flax(small_models):
    model, params, torch_model = small_models
    batch = _small_batch(seed=1)
    partner = np.array([2, 0, 3, 1])
    with jax.default_matmul_precision("highest"):
        expected = model.apply(
            {"params": params}, batch, partner, method=msa.FashionMSA.consistency
        )
    torch_model.eval()
    with torch.no_grad():
        actual = torch_model.consistency(
            torch_reference.to_torch_batch(batch), torch.from_numpy(partner)
        )
    # Same tolerance and reason as the classification outputs.
    np.testing.assert_allclose(
        actual["consistency_logit"].numpy(),
        np.asarray(expected["consistency_logit"]),
        rtol=0,
        atol=1e-5,
    )
    np.testing.assert_array_equal(
        actual["partner_has_pseudo"].numpy(), np.asarray(expected["partner_has_pseudo"])
    )


def test_torch_pretrain_step_freezes_final_fusion():
    torch.manual_seed(0)
    torch_model = torch_reference.TorchFashionMSA(SMALL_CLIP, SMALL_HEADS)
    before = {k: v.clone() for k, v in torch_model.state_dict().items()}
    step = torch_reference.make_steps(torch_model, "pretrain")["eager"]
    batch = torch_reference.to_torch_batch(_small_batch())
    batch["has_pseudo"][:] = True
    step(batch)
    step(batch)
    after = torch_model.state_dict()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if name.startswith(("pseudo_fusion.", "final_fusion.", "classifier.")):
            assert not changed, name
    assert not torch.equal(
        before["adapter.branch.hidden.weight"], after["adapter.branch.hidden.weight"]
    )
    assert not torch.equal(
        before["clip.text_projection.weight"], after["clip.text_projection.weight"]
    )


def test_trim_text_padding_shares_one_bucket():
    batch = _small_batch()
    for modality, length in (("text", 30), ("attributes", 5), ("pseudo_attributes", 9)):
        lengths = np.full(4, length)
        ids, mask = batch_lib.random_text_rows(
            np.random.default_rng(0), lengths, SMALL_CLIP
        )
        batch[f"{modality}/input_ids"], batch[f"{modality}/attention_mask"] = ids, mask
    trimmed = batch_lib.trim_text_padding(batch, [8, 16, 32, 77])
    for modality in msa.TEXT_MODALITIES:
        assert trimmed[f"{modality}/input_ids"].shape == (4, 32)
        np.testing.assert_array_equal(
            trimmed[f"{modality}/input_ids"], batch[f"{modality}/input_ids"][:, :32]
        )
        assert trimmed[f"{modality}/attention_mask"].sum() == (
            batch[f"{modality}/attention_mask"].sum()
        )
    np.testing.assert_array_equal(trimmed["image"], batch["image"])


def test_random_text_rows_layout():
    lengths = np.array([2, 5, 77])
    ids, mask = batch_lib.random_text_rows(np.random.default_rng(0), lengths, _TINY)
    eos = _TINY.text.eos_token_id
    np.testing.assert_array_equal(mask.sum(axis=1), lengths)
    assert (ids[:, 0] == _TINY.text.bos_token_id).all()
    # The first end-of-text token, which CLIP pools, is the row's last token.
    np.testing.assert_array_equal(np.argmax(ids == eos, axis=1), lengths - 1)
    assert (ids[mask == 0] == eos).all()


def test_flop_count_matches_compiled_program():
    model = msa.FashionMSA(SMALL_CLIP, SMALL_HEADS, scan_layers=True)
    mesh = sharding.create_mesh()
    batch = _small_batch(batch_size=2)
    counted = jax_steps.count_step_flops("eval", model, mesh, batch)

    unrolled = model.clone(scan_layers=False)
    params = msa.init_params(unrolled, jax.random.key(0))
    compiled = jax_steps.JaxSteps("eval", unrolled, params, mesh, seed=0).compile(
        sharding.shard_batch(batch, mesh)
    )[0]
    # The count comes from the program before XLA's optimizations, which may
    # fold or fuse a few elementwise operations; matmuls are the same.
    assert counted == pytest.approx(compiled.cost_analysis()["flops"], rel=0.02)
