"""Tests of the frozen-tower path: cached embeddings, cache keys and frozen runs.

The runs use a 60-post synthetic set, the tiny CLIP and batch 8, as in
test_train.py. Gradient clipping is off in the compared runs: clipping by the
global norm would count the tower gradients in one run and not the other.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import demo
from fashion_msa.clip import get_preset, save_pretrained
from fashion_msa.clip.tokenizer import load_tokenizer
from fashion_msa.data import builder, pipeline
from fashion_msa.model import factory
from fashion_msa.model.msa import FashionMSA, ModelConfig, init_params
from fashion_msa.train import embedding_cache, inference, sharding, trainer
from fashion_msa.train.checkpointing import RunCheckpoints
from fashion_msa.train.writer import read_records

NUM_POSTS = 60
OVERRIDES = {
    "model.hidden_dim": 32,
    "model.adapter_hidden_dim": 32,
    "train.batch_size": 8,
    "train.eval_batch_size": 16,
    "train.pretrain_epochs": 1,
    "train.finetune_epochs": 2,
    "train.eval_every_epochs": 1,
    "train.log_every_steps": 1,
    "train.checkpoint_every_steps": 100,
    "train.grad_clip_norm": 0.0,
    "train.progress_bar": False,
}


def _config(data_dir: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
    config = demo.get_config()
    config.data.data_dir = str(data_dir)
    for key, value in {**OVERRIDES, **overrides}.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def _build(root: pathlib.Path, seed: int) -> pathlib.Path:
    builder.build_dataset(
        "synthetic", root / "posts", root / "data", num_posts=NUM_POSTS, seed=seed
    )
    return root / "data"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    return _build(tmp_path_factory.mktemp("synthetic"), seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def model() -> FashionMSA:
    return FashionMSA(
        get_preset("tiny"), ModelConfig(hidden_dim=32, adapter_hidden_dim=32)
    )


@pytest.fixture(scope="module")
def params(model):
    return init_params(model, jax.random.key(0))


def _split(data_dir: pathlib.Path, split: str):
    return builder.load_split(data_dir, "synthetic", split)


def _embed(model, params, data_dir, tokenizer, split="val", **kwargs):
    return embedding_cache.compute_embeddings(
        model,
        params["clip"],
        _split(data_dir, split),
        tokenizer=tokenizer,
        batch_size=16,
        mesh=sharding.create_mesh(),
        **kwargs,
    )


def _key(model, params, data_dir, tokenizer, split="val"):
    return embedding_cache.cache_key(
        model, params["clip"], tokenizer, _split(data_dir, split), split
    )


def test_cached_outputs_equal_full_model(model, params, data_dir, tokenizer):
    table = _embed(model, params, data_dir, tokenizer)
    split_source = _split(data_dir, "val")
    assert len(table) == len(split_source)
    labels = [int(split_source[i]["label"]) for i in range(len(split_source))]
    np.testing.assert_array_equal(table.arrays["label"], labels)
    assert table.arrays["has_pseudo"].any()
    assert not table.arrays["has_pseudo"].all()

    full_loader = pipeline.make_eval_loader(
        split_source,
        global_batch_size=16,
        image_size=model.clip_config.vision.image_size,
        tokenizer=tokenizer,
    )
    cached_loader = embedding_cache.eval_loader(table, model, batch_size=16)
    heads = {k: v for k, v in params.items() if k != "clip"}
    apply = jax.jit(model.apply, static_argnames="deterministic")
    batches = 0
    for full_batch, cached_batch in zip(full_loader, cached_loader, strict=True):
        np.testing.assert_array_equal(full_batch["valid"], cached_batch["valid"])
        np.testing.assert_array_equal(full_batch["label"], cached_batch["label"])
        valid = full_batch["valid"]
        full = apply({"params": params}, full_batch)
        cached = apply({"params": heads}, cached_batch)
        for key in ("logits", "sim", "f_ori", "f_pseudo", "text_embeds"):
            diff = np.abs(np.asarray(full[key] - cached[key]))[valid].max()
            print(f"[max abs diff] {key}: {diff:.3g}")
            assert diff <= 1e-6, key
        batches += 1
    assert batches == pipeline.eval_num_batches(len(split_source), 16)


def test_trimmed_text_same_embeddings(model, params, data_dir, tokenizer):
    full = _embed(model, params, data_dir, tokenizer)
    trimmed = _embed(
        model, params, data_dir, tokenizer, text_length_buckets=(8, 16, 32, 77)
    )
    for key in model.embedding_keys:
        np.testing.assert_allclose(
            trimmed.arrays[key], full.arrays[key], atol=5e-6, err_msg=key
        )


def test_cached_dropout_matches_full_model(model, params, data_dir, tokenizer):
    table = _embed(model, params, data_dir, tokenizer)
    cached_batch = next(iter(embedding_cache.eval_loader(table, model, batch_size=16)))
    full_batch = next(
        iter(
            pipeline.make_eval_loader(
                _split(data_dir, "val"),
                global_batch_size=16,
                image_size=model.clip_config.vision.image_size,
                tokenizer=tokenizer,
            )
        )
    )
    rngs = {"dropout": jax.random.key(7)}
    heads = {k: v for k, v in params.items() if k != "clip"}
    full = model.apply({"params": params}, full_batch, deterministic=False, rngs=rngs)
    cached = model.apply(
        {"params": heads}, cached_batch, deterministic=False, rngs=rngs
    )
    eval_logits = model.apply({"params": heads}, cached_batch)["logits"]
    valid = full_batch["valid"]
    assert valid.sum() >= 8
    np.testing.assert_allclose(
        cached["logits"][valid], full["logits"][valid], atol=1e-6
    )
    # Dropout was on: the same rows without dropout give other logits.
    assert not np.allclose(cached["logits"][valid], eval_logits[valid], atol=1e-3)


def test_partial_embeddings_rejected(model, params):
    batch = {
        "text_embeds": jnp.zeros((2, 64)),
        "has_pseudo": jnp.ones(2, bool),
    }
    with pytest.raises(KeyError, match="image_embeds"):
        model.apply({"params": params}, batch)


def test_table_round_trip(model, params, data_dir, tokenizer, tmp_path):
    table = _embed(model, params, data_dir, tokenizer)
    path = tmp_path / "val.npz"
    table.save(path)
    loaded = embedding_cache.EmbeddingTable.load(path)
    assert repr(loaded) == repr(table)
    for key, value in table.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[key], value)
        assert loaded.arrays[key].dtype == value.dtype
    assert not list(tmp_path.glob("*.partial"))


def test_key_ignores_tokenizer_use(model, params, data_dir, tokenizer):
    first = _key(model, params, data_dir, tokenizer)
    tokenizer(["a tokenizer call changes its backend's padding settings"])
    assert _key(model, params, data_dir, tokenizer) == first
    assert first.digest == embedding_cache.CacheKey(**vars(first)).digest
    assert _key(model, params, data_dir, tokenizer, split="test") != first


def test_key_changes_with_data(model, params, data_dir, tokenizer, tmp_path):
    other = _build(tmp_path, seed=1)
    assert (
        _key(model, params, other, tokenizer).records
        != _key(model, params, data_dir, tokenizer).records
    )


def test_key_same_after_rebuild(model, params, data_dir, tokenizer, tmp_path):
    # Every run with the default data_dir builds its own copy of the same posts.
    # The array_record files of two builds differ in some bytes.
    rebuilt = tmp_path / "rebuilt"
    builder.build_dataset(
        "synthetic", data_dir.parent / "posts", rebuilt, num_posts=NUM_POSTS, seed=0
    )
    assert _key(model, params, rebuilt, tokenizer) == _key(
        model, params, data_dir, tokenizer
    )


def test_key_changes_with_towers_and_dtype(model, params, data_dir, tokenizer):
    reference = _key(model, params, data_dir, tokenizer)
    other = init_params(model, jax.random.key(1))
    assert _key(model, other, data_dir, tokenizer).towers != reference.towers

    # One changed number in one tensor is a different tower.
    nudged = jax.tree.map(lambda x: x, params)
    embedding = nudged["clip"]["text_model"]["embeddings"]["token_embedding"]
    nudged["clip"]["text_model"]["embeddings"]["token_embedding"] = {
        "embedding": embedding["embedding"].at[0, 0].add(1e-3)
    }
    assert _key(model, nudged, data_dir, tokenizer).towers != reference.towers

    bf16 = FashionMSA(model.clip_config, model.config, dtype=jnp.bfloat16)
    assert _key(bf16, params, data_dir, tokenizer).digest != reference.digest


def _model_config(checkpoint: pathlib.Path | str) -> ml_collections.ConfigDict:
    config = demo.get_config().model
    config.clip.checkpoint = str(checkpoint)
    return config


def test_key_follows_the_checkpoint(model, data_dir, tokenizer, tmp_path):
    clip_config = get_preset("tiny")
    keys = {}
    for name, seed in (("a", 0), ("b", 1), ("a_again", 0)):
        directory = tmp_path / name
        towers = init_params(model, jax.random.key(seed))["clip"]
        save_pretrained(clip_config, towers, directory)
        full = factory.create_params(model, _model_config(directory), jax.random.key(5))
        keys[name] = _key(model, full, data_dir, tokenizer)
    assert keys["a"] == keys["a_again"]
    assert keys["a"].towers != keys["b"].towers


def test_load_or_compute_hits_then_adds(model, params, data_dir, tokenizer, tmp_path):
    table = _embed(model, params, data_dir, tokenizer)
    calls = []

    def compute():
        calls.append(1)
        return table

    key = _key(model, params, data_dir, tokenizer)
    first = embedding_cache.load_or_compute(tmp_path, key, compute)
    second = embedding_cache.load_or_compute(tmp_path, key, compute)
    assert (first.hit, second.hit, len(calls)) == (False, True, 1)
    assert second.path == first.path
    saved = json.loads(first.path.with_suffix(".json").read_text())
    assert saved["towers"] == key.towers
    assert saved["records"] == key.records

    other_params = init_params(model, jax.random.key(3))
    other = _key(model, other_params, data_dir, tokenizer)
    third = embedding_cache.load_or_compute(tmp_path, other, compute)
    assert (third.hit, len(calls)) == (False, 2)
    names = {key.file_name, other.file_name}
    assert {p.name for p in tmp_path.glob("*.npz")} == names
    assert not list(tmp_path.glob("*.partial"))
    fourth = embedding_cache.load_or_compute(tmp_path, key, compute)
    assert (fourth.hit, len(calls)) == (True, 2)


# Whole runs.


@pytest.fixture(scope="module")
def frozen_run(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("frozen")
    config = _config(data_dir, **{"train.freeze_towers": True})
    return workdir, trainer.train_and_evaluate(config, workdir)


def test_first_run_encodes_every_split(frozen_run):
    workdir, results = frozen_run
    assert results["freeze_towers"] is True
    cache = results["embedding_cache"]
    assert set(cache) == {"train", "val", "test"}
    for split, entry in cache.items():
        assert entry["hit"] is False, split
        assert entry["num_posts"] == results["data"]["split_sizes"][split]
        assert pathlib.Path(entry["path"]).parent == workdir / "embedding_cache"
    assert [s["name"] for s in results["stages"]] == ["pretrain", "finetune"]


def test_rerun_loads_the_cache(frozen_run, data_dir):
    workdir, results = frozen_run
    again = trainer.train_and_evaluate(
        _config(data_dir, **{"train.freeze_towers": True}), workdir
    )
    assert all(entry["hit"] for entry in again["embedding_cache"].values())
    assert again["metrics"] == results["metrics"]


def test_sweep_shares_cache(frozen_run, data_dir, tmp_path):
    workdir, results = frozen_run
    shared = tmp_path / "shared_cache"
    shutil.copytree(workdir / "embedding_cache", shared)
    old_names = {p.name for p in shared.glob("*.npz")}
    overrides = {
        "train.freeze_towers": True,
        "train.embedding_cache_dir": str(shared),
        "train.pretrain_epochs": 0,
    }

    # Another head learning rate in another workdir: the same towers and data.
    config = _config(data_dir, **overrides, **{"train.head_learning_rate": 3e-3})
    swept = trainer.train_and_evaluate(config, tmp_path / "lr_3e-3")
    assert all(entry["hit"] for entry in swept["embedding_cache"].values())
    assert not (tmp_path / "lr_3e-3" / "embedding_cache").exists()

    # Other random towers: every split is encoded again, next to the old files.
    config = _config(data_dir, **overrides)
    config.seed = 1
    other = trainer.train_and_evaluate(config, tmp_path / "seed_1")
    assert not any(entry["hit"] for entry in other["embedding_cache"].values())
    new_names = {
        pathlib.Path(e["path"]).name for e in other["embedding_cache"].values()
    }
    assert len(new_names) == 3
    assert not old_names & new_names
    assert {p.name for p in shared.glob("*.npz")} == old_names | new_names


def test_frozen_run_equals_zero_tower_rate(frozen_run, data_dir, tmp_path):
    frozen_dir, frozen = frozen_run
    full = trainer.train_and_evaluate(
        _config(data_dir, **{"train.tower_learning_rate": 0.0}), tmp_path
    )
    assert full["freeze_towers"] is False
    assert full["embedding_cache"] == {}
    assert full["best_checkpoint"] == frozen["best_checkpoint"]
    for split in ("val", "test"):
        assert (
            full["metrics"][split]["confusion_matrix"]
            == frozen["metrics"][split]["confusion_matrix"]
        )
        assert full["metrics"][split]["loss"] == pytest.approx(
            frozen["metrics"][split]["loss"], abs=1e-5
        )
    full_losses = [r["loss"] for r in read_records(tmp_path) if r["split"] == "train"]
    frozen_losses = [
        r["loss"] for r in read_records(frozen_dir) if r["split"] == "train"
    ]
    np.testing.assert_allclose(frozen_losses, full_losses, atol=1e-5)

    # The best checkpoints have the same layout; the frozen towers never moved.
    def best_params(workdir):
        checkpoints = RunCheckpoints(workdir, read_only=True)
        try:
            return checkpoints.restore_best(None)[1]
        finally:
            checkpoints.close()

    frozen_params, full_params = best_params(frozen_dir), best_params(tmp_path)
    assert jax.tree.structure(frozen_params) == jax.tree.structure(full_params)
    initial = factory.create_params(
        factory.create_model(_config(data_dir).model),
        _config(data_dir).model,
        jax.random.split(jax.random.key(0))[0],
    )
    for params in (frozen_params, full_params):
        for a, b in zip(
            jax.tree.leaves(params["clip"]),
            jax.tree.leaves(initial["clip"]),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(
        jax.tree.leaves(frozen_params), jax.tree.leaves(full_params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_evaluate_reads_frozen_run(frozen_run):
    workdir, results = frozen_run
    trained = inference.load_trained(workdir)
    assert trained.best_step == results["best_checkpoint"]["global_step"]
    test = inference.evaluate_split(trained, "test", show_progress=False)
    assert test["confusion_matrix"] == results["metrics"]["test"]["confusion_matrix"]
    assert test["loss"] == pytest.approx(results["metrics"]["test"]["loss"], abs=1e-5)


def test_frozen_state_has_only_heads(frozen_run):
    workdir, _ = frozen_run
    checkpoints = RunCheckpoints(workdir, read_only=True)
    try:
        state = checkpoints.restore_state(checkpoints.latest_step(), None)
    finally:
        checkpoints.close()
    params = state["params"] if isinstance(state, dict) else state.params
    assert "clip" not in params
    assert {"image_fusion", "adapter", "classifier"} <= set(params)


def test_cache_dir_that_is_a_file_rejected(data_dir, tmp_path):
    not_a_folder = tmp_path / "cache.txt"
    not_a_folder.write_text("")
    config = _config(
        data_dir,
        **{
            "train.freeze_towers": True,
            "train.embedding_cache_dir": str(not_a_folder),
        },
    )
    with pytest.raises(NotADirectoryError, match="is a file"):
        trainer.train_and_evaluate(config, tmp_path / "run")


def test_freeze_switch_on_workdir_rejected(frozen_run, data_dir):
    workdir, _ = frozen_run
    saved_config = (workdir / "config.json").read_text()
    with pytest.raises(ValueError, match="freeze_towers=True"):
        trainer.train_and_evaluate(_config(data_dir), workdir)
    assert (workdir / "config.json").read_text() == saved_config
