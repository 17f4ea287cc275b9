"""The JAX steps the benchmarks time, and XLA's FLOP count of a step."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from configs import paper
from fashion_msa.model.msa import FashionMSA
from fashion_msa.train import optimizer as optimizer_lib
from fashion_msa.train import sharding, steps


def build_model_config(preset: str, dtype: str, scan_layers: bool) -> Any:
    """Return `config.model` of `configs/paper.py` with random towers at `preset`."""
    config = paper.get_config()
    config.model.clip.preset = preset
    config.model.clip.checkpoint = ""
    config.model.clip.dtype = dtype
    config.model.clip.scan_layers = scan_layers
    return config.model


class JaxSteps:
    """The jitted JAX steps of one step kind and the state they advance.

    The "full" and "trimmed" variants share the train state, which each step
    donates and replaces.
    """

    def __init__(
        self,
        step_kind: str,
        model: FashionMSA,
        params: Any,
        mesh: jax.sharding.Mesh,
        seed: int,
    ):
        self.step_kind = step_kind
        self.model = model
        self.mesh = mesh
        self.key = jax.random.key(seed)
        if step_kind == "eval":
            self.state = sharding.replicate(params, mesh)
            self.jitted = steps.jit_eval_step(steps.eval_step, mesh, model=model)
        else:
            self.state, self.jitted = _train_state_and_step(
                step_kind, model, params, mesh
            )
        self.step_count = 0

    def compile(self, batch: dict[str, jax.Array]) -> tuple[Any, float, float]:
        """Lower and compile for the shapes of `batch`.

        Returns:
          The executable, the lowering time and the compile time in seconds.
        """
        args = self._args(batch)
        start = time.perf_counter()
        lowered = self.jitted.lower(*args)
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        return compiled, lower_s, compile_s

    def _args(self, batch: dict[str, jax.Array]) -> tuple[Any, ...]:
        if self.step_kind == "eval":
            return (self.state, batch)
        rng = jax.random.fold_in(self.key, self.step_count)
        return (self.state, batch, rng)

    def run(self, compiled: Any, batch: dict[str, jax.Array]) -> None:
        """Run one step to completion, keeping the new state."""
        if self.step_kind == "eval":
            jax.block_until_ready(compiled(self.state, batch))
            return
        rng = jax.random.fold_in(self.key, self.step_count)
        self.state, metrics = compiled(self.state, batch, rng)
        jax.block_until_ready((self.state, metrics))
        self.step_count += 1


def _train_state_and_step(
    step_kind: str, model: FashionMSA, params: Any, mesh: jax.sharding.Mesh
) -> tuple[Any, Callable[..., Any]]:
    tx, learning_rate_fns = optimizer_lib.create_optimizer(
        optimizer_lib.OptimizerConfig(), params, step_kind, total_steps=1000
    )
    # The state owns a copy, because each step donates the parameters it is given.
    state = steps.TrainState.create(
        apply_fn=model.apply, params=jax.tree.map(jnp.copy, params), tx=tx
    )
    step_fn = steps.pretrain_step if step_kind == "pretrain" else steps.finetune_step
    jitted = steps.jit_train_step(
        step_fn, mesh, model=model, learning_rate_fns=learning_rate_fns
    )
    return sharding.replicate(state, mesh), jitted


def count_step_flops(
    step_kind: str,
    model: FashionMSA,
    mesh: jax.sharding.Mesh,
    batch: dict[str, Any],
) -> float:
    """Return XLA's FLOP count of one step of `model` (unrolled layers) on `batch`.

    XLA's cost analysis counts the body of a while loop once, so the count of a
    `scan_layers=True` program misses all but one layer. The count therefore
    comes from the same step lowered with unrolled layers; lowering compiles
    nothing, and the HLO cost analysis of the lowered program counts every dot
    and convolution of every layer.
    """
    model = model.clone(scan_layers=False)
    sample = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    dummy = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), sample)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy)["params"])
    rng = jax.random.key(0)
    if step_kind == "eval":
        jitted = steps.jit_eval_step(steps.eval_step, mesh, model=model)
        lowered = jitted.lower(params, sample)
    else:
        tx, learning_rate_fns = optimizer_lib.create_optimizer(
            optimizer_lib.OptimizerConfig(), params, step_kind, total_steps=1000
        )
        state = jax.eval_shape(
            lambda: steps.TrainState.create(
                apply_fn=model.apply,
                params=jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params),
                tx=tx,
            )
        )
        step_fn = (
            steps.pretrain_step if step_kind == "pretrain" else steps.finetune_step
        )
        jitted = steps.jit_train_step(
            step_fn, mesh, model=model, learning_rate_fns=learning_rate_fns
        )
        lowered = jitted.lower(state, sample, rng)
    return _flops(lowered.cost_analysis())


def _flops(cost_analysis: Any) -> float:
    # Older jax versions return one dict per device program.
    if isinstance(cost_analysis, Sequence):
        cost_analysis = cost_analysis[0]
    return float(cost_analysis["flops"])
