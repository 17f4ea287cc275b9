"""AdamW with separate learning rates for the CLIP towers and heads, and stage masks.

Each training stage gets its own optimizer: gradient clipping by global norm,
then `optax.multi_transform` over three parameter groups:

  tower         the CLIP towers, AdamW at `tower_learning_rate`;
  heads         fusion networks, adapter and (when trained) the final fusion and
                classifier, AdamW at `head_learning_rate`;
  frozen        `optax.set_to_zero()`: adapter pre-training freezes the final
                fusion (`Fusion_p`, `Fusion_f`) and the classifier this way, so
                neither their gradients nor weight decay move them.

Both learning rates rise linearly from 0 over `warmup_fraction` of the stage's
steps, then follow a cosine decay to 0 at the stage's last step. Weight decay
applies to kernels and embeddings (arrays with two or more dimensions), not to
biases, LayerNorm scales or the logit scale, as is usual for transformers.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from fashion_msa.model.msa import FINAL_FUSION_MODULES, TOWER_MODULE

STAGES = ("pretrain", "finetune")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer settings of a stage (see `optimizer_config_from_config`).

    Attributes:
      tower_learning_rate: peak learning rate of the CLIP towers.
      head_learning_rate: peak learning rate of everything else.
      weight_decay: AdamW decoupled weight decay coefficient.
      warmup_fraction: fraction of the stage's steps spent in linear warm-up.
      grad_clip_norm: maximum global gradient norm; 0 disables clipping.
      b1, b2, eps: Adam moment decay rates and denominator epsilon.
    """

    tower_learning_rate: float = 1e-5
    head_learning_rate: float = 5e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    grad_clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def optimizer_config_from_config(train_config: Mapping[str, Any]) -> OptimizerConfig:
    """Read the optimizer keys of `config.train` (extra keys ignored)."""
    fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
    return OptimizerConfig(
        **{k: v for k, v in dict(train_config).items() if k in fields}
    )


def create_learning_rate_schedule(
    peak_value: float, total_steps: int, warmup_fraction: float
) -> optax.Schedule:
    """Rise linearly from 0 to `peak_value`, cosine-decay to 0 at `total_steps`."""
    if total_steps < 1:
        raise ValueError(
            f"a stage needs at least one step, got total_steps={total_steps}"
        )
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    warmup_steps = int(round(warmup_fraction * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_value,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=0.0,
    )


def parameter_labels(params: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """Label every parameter leaf `tower`, `heads` or `frozen` for the given stage."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    labels = {}
    for name, subtree in params.items():
        if name == TOWER_MODULE:
            label = "tower"
        elif stage == "pretrain" and name in FINAL_FUSION_MODULES:
            label = "frozen"
        else:
            label = "heads"
        labels[name] = jax.tree.map(lambda _, label=label: label, subtree)
    return labels


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def create_optimizer(
    config: OptimizerConfig, params: Mapping[str, Any], stage: str, total_steps: int
) -> tuple[optax.GradientTransformation, dict[str, Callable[[Any], Any]]]:
    """Build the optimizer of a stage.

    Args:
      config: learning rates, weight decay, warm-up and clipping.
      params: the model parameters (only their tree structure and ranks are read).
      stage: "pretrain" (final fusion and classifier frozen) or "finetune".
      total_steps: number of optimizer steps in the stage.

    Returns:
      The optax transformation and the learning-rate schedules
      {"tower": fn, "heads": fn}, mapping the stage's step count to a rate.
    """
    schedules = {
        "tower": create_learning_rate_schedule(
            config.tower_learning_rate, total_steps, config.warmup_fraction
        ),
        "heads": create_learning_rate_schedule(
            config.head_learning_rate, total_steps, config.warmup_fraction
        ),
    }

    def adamw(schedule: optax.Schedule) -> optax.GradientTransformation:
        return optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=_decay_mask,
        )

    transforms = {
        "tower": adamw(schedules["tower"]),
        "heads": adamw(schedules["heads"]),
        "frozen": optax.set_to_zero(),
    }
    chain = []
    if config.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
    chain.append(optax.multi_transform(transforms, parameter_labels(params, stage)))
    return optax.chain(*chain), schedules
