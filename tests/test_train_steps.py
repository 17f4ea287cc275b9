"""Tests of the optimizer, its stage masks, and the jitted train and eval steps."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax.training import train_state
from test_model import BATCH, CLIP_CONFIG, HIDDEN, random_batch

from fashion_msa.model import msa
from fashion_msa.train import metrics, optimizer, sharding, steps


def _model() -> msa.FashionMSA:
    config = msa.ModelConfig(hidden_dim=HIDDEN, adapter_hidden_dim=HIDDEN)
    return msa.FashionMSA(CLIP_CONFIG, config)


@functools.cache
def _initial_params():
    return msa.init_params(_model(), jax.random.key(0))


def _state(stage: str, total_steps: int = 10, **opt_kwargs):
    params = _initial_params()
    # Large head rate so that a few steps visibly move every trained parameter.
    opt_config = optimizer.OptimizerConfig(
        head_learning_rate=1e-2,
        tower_learning_rate=1e-3,
        warmup_fraction=0.0,
        **opt_kwargs,
    )
    tx, schedules = optimizer.create_optimizer(opt_config, params, stage, total_steps)
    state = train_state.TrainState.create(
        apply_fn=_model().apply, params=jax.tree.map(np.array, params), tx=tx
    )
    return state, schedules


def _leaves_by_module(params) -> dict[str, list[np.ndarray]]:
    return {
        name: [np.asarray(x) for x in jax.tree.leaves(sub)]
        for name, sub in params.items()
    }


def _any_changed(before: list[np.ndarray], after: list[np.ndarray]) -> bool:
    return any(not np.array_equal(o, n) for o, n in zip(before, after, strict=True))


def test_schedule_warmup_then_cosine():
    schedule = optimizer.create_learning_rate_schedule(1.0, 100, 0.1)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(55)) == pytest.approx(0.5, abs=1e-6)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)


def test_schedule_single_step_stage():
    schedule = optimizer.create_learning_rate_schedule(3.0, 1, 0.1)
    assert float(schedule(0)) == pytest.approx(3.0)


def test_parameter_labels_per_stage():
    params = _initial_params()
    pretrain = optimizer.parameter_labels(params, "pretrain")
    finetune = optimizer.parameter_labels(params, "finetune")
    for name in params:
        pre = set(jax.tree.leaves(pretrain[name]))
        fine = set(jax.tree.leaves(finetune[name]))
        if name == "clip":
            assert pre == fine == {"tower"}
        elif name in msa.FINAL_FUSION_MODULES:
            assert pre == {"frozen"}
            assert fine == {"heads"}
        else:
            assert pre == fine == {"heads"}


def test_pretraining_leaves_final_fusion_bit_identical():
    state, schedules = _state("pretrain")
    before = _leaves_by_module(state.params)
    mesh = sharding.create_mesh(jax.devices()[:1])
    step = steps.jit_train_step(
        steps.pretrain_step, mesh, model=_model(), learning_rate_fns=schedules
    )
    for i in range(3):
        batch = sharding.shard_batch(random_batch(seed=i), mesh)
        state, step_metrics = step(state, batch, jax.random.key(i))
        assert np.isfinite(float(step_metrics["loss"]))
        assert float(step_metrics["pairs"]) > 0
    after = _leaves_by_module(state.params)

    # Partners without pseudo data carry no signal: no pair counts, the loss is 0.
    batch = random_batch()
    batch["has_pseudo"] = np.zeros(BATCH, bool)
    _, step_metrics = step(state, sharding.shard_batch(batch, mesh), jax.random.key(9))
    assert float(step_metrics["pairs"]) == 0.0
    assert float(step_metrics["loss"]) == 0.0

    for name in msa.FINAL_FUSION_MODULES:
        for old, new in zip(before[name], after[name], strict=True):
            # Byte equality: even a zero update could flip the sign of a zero.
            assert old.tobytes() == new.tobytes(), name
    for name in ("clip", "image_fusion", "adapter"):
        moved = [
            not np.array_equal(o, n)
            for o, n in zip(before[name], after[name], strict=True)
        ]
        assert any(moved), f"{name} did not train during pre-training"


def test_finetuning_trains_final_fusion():
    state, schedules = _state("finetune")
    before = _leaves_by_module(state.params)
    mesh = sharding.create_mesh(jax.devices()[:1])
    step = steps.jit_train_step(
        steps.finetune_step, mesh, model=_model(), learning_rate_fns=schedules
    )
    batch = sharding.shard_batch(random_batch(), mesh)
    state, step_metrics = step(state, batch, jax.random.key(0))
    after = _leaves_by_module(state.params)
    for name in ("clip", "image_fusion", "adapter", *msa.FINAL_FUSION_MODULES):
        moved = [
            not np.array_equal(o, n)
            for o, n in zip(before[name], after[name], strict=True)
        ]
        assert any(moved), f"{name} did not train during fine-tuning"
    expected_keys = {
        "loss",
        "accuracy",
        "mean_sim",
        "grad_norm",
        "param_norm",
        "learning_rate/tower",
        "learning_rate/heads",
    }
    assert set(step_metrics) == expected_keys
    assert float(step_metrics["learning_rate/heads"]) == pytest.approx(1e-2)
    assert float(step_metrics["learning_rate/tower"]) == pytest.approx(1e-3)
    assert int(state.step) == 1


def test_weight_decay_skips_biases():
    # No gradient signal (learning rate only through decay): zero grads, so only
    # weight decay can move parameters.
    params = {
        "heads_module": {
            "kernel": np.ones((2, 2), np.float32),
            "bias": np.ones(2, np.float32),
        }
    }
    config = optimizer.OptimizerConfig(
        head_learning_rate=0.1, warmup_fraction=0.0, weight_decay=0.5, grad_clip_norm=0
    )
    tx, _ = optimizer.create_optimizer(config, params, "finetune", 10)
    opt_state = tx.init(params)
    grads = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["heads_module"]["kernel"], 1 - 0.1 * 0.5)
    np.testing.assert_array_equal(new["heads_module"]["bias"], 1.0)


def test_pretrain_pairs_and_weights():
    rng = jax.random.key(3)
    partner = steps.sample_partners(rng, 8)
    assert sorted(np.asarray(partner).tolist()) == list(range(8))


def test_eval_step_confusion_matches_metrics():
    model = _model()
    params = _initial_params()
    batch = random_batch(batch_size=8)
    batch["valid"] = np.array([True] * 6 + [False] * 2)
    mesh = sharding.create_mesh(jax.devices()[:1])
    eval_step = steps.jit_eval_step(steps.eval_step, mesh, model=model)
    out = eval_step(params, sharding.shard_batch(batch, mesh))

    outputs = jax.jit(model.apply)({"params": params}, batch)
    predictions = np.asarray(outputs["logits"]).argmax(-1)
    expected = metrics.confusion_matrix(batch["label"][:6], predictions[:6])
    np.testing.assert_array_equal(np.asarray(out["confusion"]), expected)
    assert int(out["count"]) == 6
    sim = outputs["sim"]
    np.testing.assert_allclose(
        float(out["sim_sum"]), float(np.asarray(sim).mean(-1)[:6].sum()), rtol=1e-5
    )


def test_predict_step_probabilities():
    model = _model()
    params = _initial_params()
    mesh = sharding.create_mesh(jax.devices()[:1])
    predict = steps.jit_eval_step(steps.predict_step, mesh, model=model)
    out = predict(params, sharding.shard_batch(random_batch(), mesh))
    np.testing.assert_allclose(np.asarray(out["probabilities"]).sum(-1), 1.0, rtol=1e-6)
    assert np.all((np.asarray(out["mean_sim"]) > 0) & (np.asarray(out["mean_sim"]) < 1))


def test_shard_batch_rejects_indivisible_batch():
    mesh = sharding.create_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match="disagree"):
        sharding.shard_batch({"a": np.zeros(3), "b": np.zeros(4)}, mesh)
