"""Data parallelism: train steps on 4 CPU devices agree with 1 device.

XLA can split the host CPU into several devices only before JAX starts, so the
check runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT

from fashion_msa.train import sharding

# The subprocess runs a pre-training and a fine-tuning step and an eval step
# on the same state and batch, once on a 1-device mesh and once on a 4-device
# mesh, and prints the differences as JSON.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from flax.training import train_state
    sys.path.insert(0, "tests")
    from test_model import CLIP_CONFIG, HIDDEN, random_batch
    from fashion_msa.model import msa
    from fashion_msa.train import optimizer, sharding, steps

    assert jax.device_count() == 4, jax.devices()
    model = msa.FashionMSA(
        CLIP_CONFIG, msa.ModelConfig(hidden_dim=HIDDEN, adapter_hidden_dim=HIDDEN)
    )
    # Host copies: each run's state is donated to its step, which frees its buffers.
    params = jax.device_get(msa.init_params(model, jax.random.key(0)))
    batch = random_batch(seed=1, batch_size=8)
    # Adam's first update is lr * g / (|g| + eps): with the default eps=1e-8 it
    # is about lr * sign(g), which turns last-bit differences of near-zero
    # gradients into differences of size lr. eps=1e-3 keeps the update
    # proportional to small gradients, so the comparison measures the gradients.
    config = optimizer.OptimizerConfig(
        tower_learning_rate=1e-3, head_learning_rate=1e-3, warmup_fraction=0.0,
        eps=1e-3,
    )
    report = {}
    for stage, step_fn in (
        ("pretrain", steps.pretrain_step), ("finetune", steps.finetune_step)
    ):
        tx, schedules = optimizer.create_optimizer(config, params, stage, 10)
        results = []
        for num_devices in (1, 4):
            mesh = sharding.create_mesh(jax.devices()[:num_devices])
            state = train_state.TrainState.create(
                apply_fn=model.apply, params=params, tx=tx
            )
            state = sharding.replicate(state, mesh)
            step = steps.jit_train_step(
                step_fn, mesh, model=model, learning_rate_fns=schedules
            )
            state, metrics = step(
                state, sharding.shard_batch(batch, mesh), jax.random.key(5)
            )
            results.append((jax.device_get(state.params), jax.device_get(metrics)))
        (params_1, metrics_1), (params_4, metrics_4) = results
        param_diff = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_4))
        )
        report[stage] = {
            "loss_1": float(metrics_1["loss"]),
            "loss_4": float(metrics_4["loss"]),
            "max_param_diff": param_diff,
            "params_replicated": all(
                x.sharding.is_fully_replicated and len(x.sharding.device_set) == 4
                for x in jax.tree.leaves(state.params)
            ),
        }

    evals = []
    for num_devices in (1, 4):
        mesh = sharding.create_mesh(jax.devices()[:num_devices])
        eval_step = steps.jit_eval_step(steps.eval_step, mesh, model=model)
        out = eval_step(
            sharding.replicate(params, mesh), sharding.shard_batch(batch, mesh)
        )
        evals.append(np.asarray(out["confusion"]).tolist())
    report["eval_confusion"] = evals

    mesh = sharding.create_mesh()
    try:
        sharding.shard_batch(random_batch(batch_size=6), mesh)
        report["indivisible_error"] = None
    except ValueError as e:
        report["indivisible_error"] = str(e)
    print("REPORT " + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    )
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_four_devices_match_one(report, stage):
    result = report[stage]
    # Splitting the batch changes the order of the float32 sums in the loss and
    # in the gradient all-reduce, which moves values in the last few bits.
    np.testing.assert_allclose(result["loss_4"], result["loss_1"], rtol=1e-5)
    # One AdamW step at learning rate 1e-3 moves a parameter by at most 1e-3.
    # The bound is 0.1% of that: above float32 rounding of the gradient sums,
    # far below the effect of any gradient computed on the wrong rows.
    assert result["max_param_diff"] < 1e-6, result
    assert result["params_replicated"]


def test_eval_confusion_same_on_four_devices(report):
    assert report["eval_confusion"][0] == report["eval_confusion"][1]


def test_indivisible_batch_rejected(report):
    message = report["indivisible_error"]
    assert message is not None
    assert "not divisible by the 4 devices" in message


def test_single_device_mesh_in_process():
    mesh = sharding.create_mesh(jax.devices()[:1])
    assert mesh.axis_names == (sharding.DATA_AXIS,)
    batch = sharding.shard_batch({"x": np.arange(4.0)}, mesh)
    assert batch["x"].sharding == sharding.batch_sharding(mesh)


def test_partial_multihost_flags_rejected():
    with pytest.raises(ValueError, match="together"):
        sharding.initialize_distributed("127.0.0.1:1234", None, 0)
