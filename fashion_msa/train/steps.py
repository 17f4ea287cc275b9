"""Pure train and eval steps: adapter pre-training, fine-tuning and evaluation.

Each train step maps `(state, batch, rng) -> (state, metrics)`. The model and the
learning-rate schedules are bound with `functools.partial` before jitting (see
`jit_train_step`). `rng` is the step's key. The trainer folds the global step
into the run's key, so a resumed run draws the same dropout masks and pairings.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import Mesh

from fashion_msa.model.msa import FashionMSA
from fashion_msa.train import sharding

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
TrainState = train_state.TrainState
StepFn = Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]


def create_train_state(
    model: FashionMSA, params: Any, tx: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
    """Build a train state at step 0 with parameters and optimizer state replicated.

    The train steps donate their state, so the buffers of `params` may be freed
    by the first step; pass a copy to keep using them.
    """
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    return sharding.replicate(state, mesh)


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean of `values` over rows with weight 1 (0 when no row has weight)."""
    weights = weights.astype(jnp.float32)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _norm_metrics(
    state: TrainState,
    grads: Any,
    learning_rate_fns: Mapping[str, Callable[[Any], Any]],
) -> Metrics:
    metrics = {
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(state.params),
    }
    for group, schedule in learning_rate_fns.items():
        metrics[f"learning_rate/{group}"] = jnp.asarray(
            schedule(state.step), jnp.float32
        )
    return metrics


def sample_partners(rng: jax.Array, batch_size: int) -> jax.Array:
    """Pair each row with the row at a random permutation of the batch.

    The training loader shuffles the whole training set every epoch, so pairing
    inside a batch pairs random posts of the set, as adapter pre-training needs.
    A row may be paired with itself, which is a matching pair.
    """
    return jax.random.permutation(rng, batch_size)


def pretrain_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    model: FashionMSA,
    learning_rate_fns: Mapping[str, Callable[[Any], Any]],
) -> tuple[TrainState, Metrics]:
    """Train the adapter to tell whether a post and its partner share a sentiment.

    Each post i is paired with a partner j; the adapter compares F_ori(i) with
    F_P(j), and the target is 1 when label(i) == label(j). The loss is binary
    cross-entropy on the consistency logit, averaged over valid pairs whose partner
    has pseudo data (pairs without a pseudo partner carry no signal).
    """
    partner_rng, dropout_rng = jax.random.split(rng)
    labels = batch["label"]
    partner = sample_partners(partner_rng, labels.shape[0])
    targets = (labels == labels[partner]).astype(jnp.float32)

    def loss_fn(params: Any) -> tuple[jax.Array, Metrics]:
        outputs = model.apply(
            {"params": params},
            batch,
            partner,
            deterministic=False,
            rngs={"dropout": dropout_rng},
            method=FashionMSA.consistency,
        )
        logits = outputs["consistency_logit"]
        weights = (
            batch["valid"] & batch["valid"][partner] & outputs["partner_has_pseudo"]
        )
        loss = _weighted_mean(
            optax.sigmoid_binary_cross_entropy(logits, targets), weights
        )
        correct = ((logits > 0).astype(jnp.float32) == targets).astype(jnp.float32)
        aux = {
            "accuracy": _weighted_mean(correct, weights),
            "matching_pair_fraction": _weighted_mean(targets, weights),
            "mean_sim": jnp.mean(outputs["sim"]),
            "pairs": jnp.sum(weights.astype(jnp.float32)),
        }
        return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss": loss, **aux, **_norm_metrics(state, grads, learning_rate_fns)}
    return state.apply_gradients(grads=grads), metrics


def classification_loss(
    logits: jax.Array, labels: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy over valid rows of logits (batch, classes)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    )
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return _weighted_mean(losses, valid), _weighted_mean(correct, valid)


def finetune_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    model: FashionMSA,
    learning_rate_fns: Mapping[str, Callable[[Any], Any]],
) -> tuple[TrainState, Metrics]:
    """Train the whole model with cross-entropy on the sentiment logits."""

    def loss_fn(params: Any) -> tuple[jax.Array, Metrics]:
        outputs = model.apply(
            {"params": params}, batch, deterministic=False, rngs={"dropout": rng}
        )
        loss, accuracy = classification_loss(
            outputs["logits"], batch["label"], batch["valid"]
        )
        aux = {"accuracy": accuracy}
        if "sim" in outputs:
            aux["mean_sim"] = jnp.mean(outputs["sim"])
        return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss": loss, **aux, **_norm_metrics(state, grads, learning_rate_fns)}
    return state.apply_gradients(grads=grads), metrics


def eval_step(params: Any, batch: Batch, *, model: FashionMSA) -> Metrics:
    """Sum the confusion matrix, loss and adapter similarity over a batch's valid rows.

    Returns:
      `confusion` int32 (classes, classes) with true classes as rows, `loss_sum`,
      `sim_sum` (sum over valid rows of the row's mean Sim; 0 without adapter) and
      `count` (valid rows). Sums, not means, so that batches add up exactly.
    """
    outputs = model.apply({"params": params}, batch, deterministic=True)
    logits = outputs["logits"].astype(jnp.float32)
    num_classes = logits.shape[-1]
    valid = batch["valid"].astype(jnp.int32)
    predictions = jnp.argmax(logits, axis=-1)

    true_one_hot = jax.nn.one_hot(batch["label"], num_classes, dtype=jnp.int32)
    pred_one_hot = jax.nn.one_hot(predictions, num_classes, dtype=jnp.int32)
    confusion = jnp.einsum("b,bi,bj->ij", valid, true_one_hot, pred_one_hot)

    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    sim_rows = (
        jnp.mean(outputs["sim"], axis=-1)
        if "sim" in outputs
        else jnp.zeros_like(losses)
    )
    return {
        "confusion": confusion,
        "loss_sum": jnp.sum(losses * valid),
        "sim_sum": jnp.sum(sim_rows * valid),
        "count": jnp.sum(valid),
    }


def predict_step(params: Any, batch: Batch, *, model: FashionMSA) -> Metrics:
    """Return class probabilities (batch, classes) and each row's mean Sim (batch,)."""
    outputs = model.apply({"params": params}, batch, deterministic=True)
    probabilities = jax.nn.softmax(outputs["logits"].astype(jnp.float32), axis=-1)
    if "sim" in outputs:
        mean_sim = jnp.mean(outputs["sim"], axis=-1)
    else:
        mean_sim = jnp.full(probabilities.shape[:1], jnp.nan)
    return {"probabilities": probabilities, "mean_sim": mean_sim}


def jit_train_step(
    step_fn: Callable[..., tuple[TrainState, Metrics]],
    mesh: Mesh,
    *,
    model: FashionMSA,
    learning_rate_fns: Mapping[str, Callable[[Any], Any]],
) -> StepFn:
    """Jit a train step on the mesh: state replicated and donated, batch split."""
    replicated = sharding.replicated_sharding(mesh)
    return jax.jit(
        functools.partial(step_fn, model=model, learning_rate_fns=learning_rate_fns),
        in_shardings=(replicated, sharding.batch_sharding(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )


def jit_eval_step(
    step_fn: Callable[..., Metrics], mesh: Mesh, *, model: FashionMSA
) -> Callable[[Any, Batch], Metrics]:
    """Jit an eval or predict step on the mesh (parameters replicated, not donated).

    The outputs of `eval_step` are sums over the batch and come back replicated.
    `predict_step` outputs keep the batch split.
    """
    replicated = sharding.replicated_sharding(mesh)
    out = replicated if step_fn is eval_step else sharding.batch_sharding(mesh)
    return jax.jit(
        functools.partial(step_fn, model=model),
        in_shardings=(replicated, sharding.batch_sharding(mesh)),
        out_shardings=out,
    )
