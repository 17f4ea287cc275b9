"""PyTorch reference of FashionMSA and its train and eval steps, for benchmarking.

The towers are transformers' PyTorch `CLIPModel` (its default SDPA attention),
and the heads mirror `fashion_msa.model` module for module: `Fusion`
(concatenate, Linear, exact GELU, Dropout, Linear), the Siamese adapter, the
pseudo and final fusions and the classifier. Module names follow the Flax
parameter tree (`image_fusion.hidden` is `image_fusion/hidden`), so
`load_flax_params` copies a Flax model's weights in and the two implementations
compute the same function.

The steps do the work of `fashion_msa.train.steps` on the same batch: the text
tower runs once on the 3 * batch text-like rows and the vision tower once on the
2 * batch images; AdamW at 1e-5 (towers) and 5e-4 (heads) with weight decay on
tensors of rank 2 or more, gradient clipping at global norm 1.0, and a warm-up
cosine learning-rate schedule. Mixed precision is `torch.autocast` in bfloat16
over the towers, with float32 parameters, optimizer state and heads.

Only the paper configuration is built: fusion "paper", one shared image
fusion, the adapter on.
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn

from fashion_msa.clip.checkpoint import save_pretrained
from fashion_msa.clip.config import CLIPConfig
from fashion_msa.model.msa import IMAGE_MODALITIES, TEXT_MODALITIES, ModelConfig

TOWER_LEARNING_RATE = 1e-5
HEAD_LEARNING_RATE = 5e-4
WEIGHT_DECAY = 0.01
GRAD_CLIP_NORM = 1.0
WARMUP_STEPS = 10
TOTAL_STEPS = 1000


class Fusion(nn.Module):
    """Concatenate the inputs, then Linear -> GELU -> Dropout -> Linear."""

    def __init__(
        self, in_features: int, features: int, hidden_dim: int, dropout_rate: float
    ):
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden_dim)
        self.dropout = nn.Dropout(dropout_rate)
        self.output = nn.Linear(hidden_dim, features)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x = torch.cat(inputs, dim=-1)
        x = self.dropout(nn.functional.gelu(self.hidden(x)))
        return self.output(x)


class SiameseBranch(nn.Module):
    """The shared MLP `g` of the adapter: Linear -> GELU -> Linear."""

    def __init__(self, features: int, hidden_dim: int):
        super().__init__()
        self.hidden = nn.Linear(features, hidden_dim)
        self.output = nn.Linear(hidden_dim, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(nn.functional.gelu(self.hidden(x)))


class SelfAdaptiveAdapter(nn.Module):
    """Siamese branch, fusion of `[u, v, |u - v|, u * v]`, sigmoid, consistency head."""

    def __init__(self, features: int, hidden_dim: int, dropout_rate: float):
        super().__init__()
        self.branch = SiameseBranch(features, hidden_dim)
        self.fusion = Fusion(4 * features, features, hidden_dim, dropout_rate)
        self.consistency_head = nn.Linear(features, 1)

    def forward(
        self, f_ori: torch.Tensor, f_pseudo: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.branch(f_ori)
        v = self.branch(f_pseudo)
        sim = torch.sigmoid(self.fusion(u, v, torch.abs(u - v), u * v))
        return sim, self.consistency_head(sim)[..., 0]


class TorchFashionMSA(nn.Module):
    """FashionMSA on transformers' PyTorch CLIP (only the `configs/paper.py` heads).

    Batches are dicts of tensors with the keys of the JAX input pipeline, except
    that "image" and "pseudo_image" are NCHW, as PyTorch's CLIP reads them.
    """

    def __init__(
        self,
        clip_config: CLIPConfig,
        model_config: ModelConfig,
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not model_config.has_adapter or not model_config.share_image_fusion:
            raise ValueError(
                "the PyTorch reference builds only fusion='paper' with the adapter "
                "and a shared image fusion"
            )
        hf_config = transformers.CLIPConfig.from_dict(clip_config.to_hf_dict())
        self.clip = transformers.CLIPModel(hf_config)
        self.clip_config = clip_config
        self.model_config = model_config
        self.autocast_dtype = autocast_dtype

        d = clip_config.projection_dim
        hidden, dropout = model_config.hidden_dim, model_config.dropout_rate
        self.image_fusion = Fusion(2 * d, d, hidden, dropout)
        self.adapter = SelfAdaptiveAdapter(d, model_config.adapter_hidden_dim, dropout)
        self.pseudo_fusion = Fusion(2 * d, d, hidden, dropout)
        self.final_fusion = Fusion(3 * d, d, hidden, dropout)
        self.classifier = nn.Linear(d, model_config.num_classes)

    def _tower_autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.autocast_dtype)

    def embed(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run each tower once on the stacked inputs; return (batch, d) float32 rows."""
        input_ids = torch.cat([batch[f"{m}/input_ids"] for m in TEXT_MODALITIES])
        attention_mask = torch.cat(
            [batch[f"{m}/attention_mask"] for m in TEXT_MODALITIES]
        )
        pixel_values = torch.cat([batch[m] for m in IMAGE_MODALITIES])
        with self._tower_autocast():
            text_out = self.clip.get_text_features(
                input_ids=input_ids, attention_mask=attention_mask
            ).pooler_output
            image_out = self.clip.get_image_features(
                pixel_values=pixel_values
            ).pooler_output
        text_out, image_out = text_out.float(), image_out.float()
        if self.model_config.normalize_embeddings:
            text_out = nn.functional.normalize(text_out, dim=-1, eps=1e-12)
            image_out = nn.functional.normalize(image_out, dim=-1, eps=1e-12)
        text, attributes, pseudo_attributes = text_out.chunk(3)
        image, pseudo_image = image_out.chunk(2)
        return {
            "text_embeds": text,
            "attribute_embeds": attributes,
            "pseudo_attribute_embeds": pseudo_attributes,
            "image_embeds": image,
            "pseudo_image_embeds": pseudo_image,
        }

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return `logits` (batch, classes), `sim` (batch, d) and the embeddings."""
        embeds = self.embed(batch)
        f_ori = self.image_fusion(embeds["image_embeds"], embeds["attribute_embeds"])
        f_pseudo = self.image_fusion(
            embeds["pseudo_image_embeds"], embeds["pseudo_attribute_embeds"]
        )
        sim, consistency_logit = self.adapter(f_ori, f_pseudo)
        has_pseudo = batch["has_pseudo"].float()[:, None]
        f_pseudo_adapted = sim * f_pseudo * has_pseudo
        text_embeds = embeds["text_embeds"]
        f_pseudo_text = self.pseudo_fusion(f_pseudo_adapted, text_embeds)
        fused = self.final_fusion(f_pseudo_text, text_embeds, f_ori)
        return {
            "logits": self.classifier(fused),
            "sim": sim,
            "consistency_logit": consistency_logit,
            **embeds,
        }

    def consistency(
        self, batch: Mapping[str, torch.Tensor], partner: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Score each post's `F_ori` against its partner's `F_P` (pre-training)."""
        embeds = self.embed(batch)
        f_ori = self.image_fusion(embeds["image_embeds"], embeds["attribute_embeds"])
        f_pseudo = self.image_fusion(
            embeds["pseudo_image_embeds"], embeds["pseudo_attribute_embeds"]
        )
        sim, consistency_logit = self.adapter(f_ori, f_pseudo[partner])
        return {
            "consistency_logit": consistency_logit,
            "sim": sim,
            "partner_has_pseudo": batch["has_pseudo"][partner],
        }


def to_torch_batch(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Convert a JAX-pipeline batch (NHWC images) to tensors with NCHW images."""
    tensors = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if key in IMAGE_MODALITIES:
            value = np.ascontiguousarray(value.transpose(0, 3, 1, 2))
        elif value.dtype == np.int32:
            # Embedding lookups and indexing want int64 in PyTorch.
            value = value.astype(np.int64)
        tensors[key] = torch.from_numpy(value)
    return tensors


def load_flax_params(model: TorchFashionMSA, params: Mapping[str, Any]) -> None:
    """Copy a Flax FashionMSA parameter tree into `model`.

    The CLIP towers go through `save_pretrained` and transformers' own loader.
    Head kernels (in, out) become Linear weights (out, in).
    """
    with tempfile.TemporaryDirectory() as directory:
        clip_dir = pathlib.Path(directory)
        save_pretrained(model.clip_config, params["clip"], clip_dir)
        loaded = transformers.CLIPModel.from_pretrained(clip_dir)
        model.clip.load_state_dict(loaded.state_dict())

    state = {}
    for path, leaf in _flatten({k: v for k, v in params.items() if k != "clip"}):
        array = np.asarray(leaf, dtype=np.float32)
        if path[-1] == "kernel":
            state[".".join(path[:-1] + ("weight",))] = torch.from_numpy(array.T.copy())
        else:
            state[".".join(path)] = torch.from_numpy(array.copy())
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith("clip.")}
    if set(state) != set(heads):
        raise ValueError(
            f"Flax head parameters {sorted(set(state) ^ set(heads))} have no "
            "counterpart in the PyTorch reference"
        )
    model.load_state_dict(state, strict=False)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, prefix + (name,))
        else:
            yield prefix + (name,), value


def create_optimizer(
    model: TorchFashionMSA, stage: str
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the parameters a stage trains, with the library's two learning rates.

    Adapter pre-training leaves out the pseudo and final fusions and the
    classifier, as the JAX optimizer masks them.
    """
    frozen = (
        ("pseudo_fusion.", "final_fusion.", "classifier.")
        if stage == "pretrain"
        else ()
    )
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if name.startswith(frozen):
            continue
        key = (name.startswith("clip."), parameter.ndim >= 2)
        groups.setdefault(key, []).append(parameter)
    param_groups = [
        {
            "params": parameters,
            "lr": TOWER_LEARNING_RATE if is_tower else HEAD_LEARNING_RATE,
            "weight_decay": WEIGHT_DECAY if decays else 0.0,
        }
        for (is_tower, decays), parameters in groups.items()
    ]
    # The fused CPU kernel is PyTorch's fastest AdamW; it exists since torch 2.4.
    optimizer = torch.optim.AdamW(param_groups, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine)
    return optimizer, scheduler


def _warmup_cosine(step: int) -> float:
    if step < WARMUP_STEPS:
        return step / WARMUP_STEPS
    progress = min(1.0, (step - WARMUP_STEPS) / (TOTAL_STEPS - WARMUP_STEPS))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    weights = weights.float()
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def finetune_loss(
    model: TorchFashionMSA, batch: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Mean cross-entropy of the sentiment logits over valid rows."""
    logits = model(batch)["logits"].float()
    losses = nn.functional.cross_entropy(logits, batch["label"], reduction="none")
    return _weighted_mean(losses, batch["valid"])


def pretrain_loss(
    model: TorchFashionMSA,
    batch: Mapping[str, torch.Tensor],
    partner: torch.Tensor,
) -> torch.Tensor:
    """Binary cross-entropy of the consistency logit, over pairs with pseudo data."""
    labels = batch["label"]
    targets = (labels == labels[partner]).float()
    outputs = model.consistency(batch, partner)
    logits = outputs["consistency_logit"].float()
    weights = batch["valid"] & batch["valid"][partner] & outputs["partner_has_pseudo"]
    losses = nn.functional.binary_cross_entropy_with_logits(
        logits, targets, reduction="none"
    )
    return _weighted_mean(losses, weights)


def eval_sums(
    model: TorchFashionMSA, batch: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return the confusion matrix, loss sum and Sim sum over valid rows."""
    outputs = model(batch)
    logits = outputs["logits"].float()
    valid = batch["valid"].long()
    num_classes = logits.shape[-1]
    predictions = logits.argmax(dim=-1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((batch["label"], predictions), valid, accumulate=True)
    losses = nn.functional.cross_entropy(logits, batch["label"], reduction="none")
    return {
        "confusion": confusion,
        "loss_sum": (losses * valid).sum(),
        "sim_sum": (outputs["sim"].mean(dim=-1) * valid).sum(),
        "count": valid.sum(),
    }


def make_steps(
    model: TorchFashionMSA, step_kind: str, seed: int = 0
) -> dict[str, Callable[[Mapping[str, torch.Tensor]], Any]]:
    """Build the eager and the `torch.compile` step of `step_kind` on `model`.

    Returns {"eager": fn, "compile": fn}; each fn runs a whole step on a batch:
    forward, backward, gradient clipping, AdamW and the schedule for
    "pretrain" and "finetune", a forward under `torch.no_grad` for "eval". Both
    share the model and one optimizer, so their timings can interleave. The
    compiled step wraps the loss (or the eval forward) in `torch.compile`; the
    optimizer runs eagerly in both, since the fused AdamW kernel is already one
    call per parameter group.
    """
    if step_kind == "eval":

        def eval_step(forward: Callable[..., Any]) -> Callable[..., Any]:
            def step(batch: Mapping[str, torch.Tensor]) -> Any:
                model.eval()
                with torch.no_grad():
                    return forward(model, batch)

            return step

        return {
            "eager": eval_step(eval_sums),
            "compile": eval_step(torch.compile(eval_sums, dynamic=False)),
        }

    if step_kind not in ("pretrain", "finetune"):
        raise ValueError(f"unknown step kind {step_kind!r}")
    optimizer, scheduler = create_optimizer(model, step_kind)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    loss_fn = pretrain_loss if step_kind == "pretrain" else finetune_loss
    generator = torch.Generator().manual_seed(seed)

    def train_step(loss_fn: Callable[..., torch.Tensor]) -> Callable[..., Any]:
        def step(batch: Mapping[str, torch.Tensor]) -> Any:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            if step_kind == "pretrain":
                partner = torch.randperm(batch["label"].shape[0], generator=generator)
                loss = loss_fn(model, batch, partner)
            else:
                loss = loss_fn(model, batch)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP_NORM)
            optimizer.step()
            scheduler.step()
            return loss.detach(), grad_norm

        return step

    return {
        "eager": train_step(loss_fn),
        "compile": train_step(torch.compile(loss_fn, dynamic=False)),
    }


def count_flops(step: Callable[[Mapping[str, torch.Tensor]], Any], batch: Any) -> int:
    """Count the FLOPs of one eager step with `torch.utils.flop_counter`.

    PyTorch counts matmuls, convolutions and attention only (2 per multiply-add),
    so elementwise work is left out.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    return int(counter.get_total_flops())
