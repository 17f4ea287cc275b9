"""FashionMSA: CLIP towers, attribute-guided image fusion, adapter and final fusion.

The model of Zhao et al., "Bridging Modality Gap for Effective Multimodal
Sentiment Analysis in Fashion-related Social Media" (COLING 2025, section 3):

  H_T, H_A, H_PA = CLIP text tower (text, attributes, pseudo attributes)
  H_I, H_PI      = CLIP vision tower (image, pseudo image)
  F_ori = Fusion_img(H_I, H_A)          F_P = Fusion_img(H_PI, H_PA)
  Sim, consistency_logit = Adapter(F_ori, F_P)
  F_P'  = Sim * F_P, zeroed for posts without pseudo data
  F_P'' = Fusion_p(F_P', H_T)
  F     = Fusion_f(F_P'', H_T, F_ori)   logits = Dense(3)(F)

The paper leaves open the width of the hidden MLP layers, dropout, and the
normalisation of the CLIP features. `ModelConfig` sets them, by default to
hidden width 512, dropout 0.1 and L2-normalised features.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fashion_msa.clip.config import CLIPConfig
from fashion_msa.clip.modeling import CLIP
from fashion_msa.model.adapter import SelfAdaptiveAdapter
from fashion_msa.model.baselines import BASELINE_HEADS
from fashion_msa.model.fusion import Fusion

# Order in which baseline heads receive the modality features.
MODALITIES: tuple[str, ...] = (
    "text",
    "image",
    "attributes",
    "pseudo_image",
    "pseudo_attributes",
)
TEXT_MODALITIES: tuple[str, ...] = ("text", "attributes", "pseudo_attributes")
IMAGE_MODALITIES: tuple[str, ...] = ("image", "pseudo_image")
PSEUDO_MODALITIES: frozenset[str] = frozenset({"pseudo_image", "pseudo_attributes"})
FUSION_METHODS: tuple[str, ...] = ("paper", "concat", "add", "attention")

# Output key of each modality's CLIP embedding.
EMBEDDING_KEYS: dict[str, str] = {
    "text": "text_embeds",
    "attributes": "attribute_embeds",
    "pseudo_attributes": "pseudo_attribute_embeds",
    "image": "image_embeds",
    "pseudo_image": "pseudo_image_embeds",
}

# Top-level parameter collections. Adapter pre-training freezes FINAL_FUSION_MODULES.
TOWER_MODULE = "clip"
FINAL_FUSION_MODULES: tuple[str, ...] = ("pseudo_fusion", "final_fusion", "classifier")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of the fusion heads and the ablation switches.

    Attributes:
      num_classes: sentiment classes (negative, neutral, positive).
      hidden_dim: hidden width of every `Fusion` MLP.
      adapter_hidden_dim: hidden width of the adapter's Siamese MLP and fusion.
      dropout_rate: dropout inside the fusion MLPs and the adapter.
      normalize_embeddings: L2-normalise the projected CLIP embeddings.
      share_image_fusion: one `Fusion_img` for (H_I, H_A) and (H_PI, H_PA).
      use_adapter: False replaces `Sim` by ones (the "-Adapter" ablation).
      fusion: "paper" (the full model) or a baseline head: "concat", "add",
        "attention".
      modalities: features the baseline heads fuse, a subset of MODALITIES.
        The paper fusion needs all five.
      attention_num_heads: heads of the "attention" baseline.
    """

    num_classes: int = 3
    hidden_dim: int = 512
    adapter_hidden_dim: int = 512
    dropout_rate: float = 0.1
    normalize_embeddings: bool = True
    share_image_fusion: bool = True
    use_adapter: bool = True
    fusion: str = "paper"
    modalities: tuple[str, ...] = MODALITIES
    attention_num_heads: int = 4

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_METHODS:
            raise ValueError(
                f"fusion must be one of {FUSION_METHODS}, got {self.fusion!r}"
            )
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ValueError(
                f"modalities must be a non-empty subset of {MODALITIES}, got "
                f"{self.modalities!r}"
            )
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities lists a modality twice: {self.modalities!r}")
        # Canonical order, so that ("image", "text") and ("text", "image") build the
        # same parameter tree.
        object.__setattr__(
            self, "modalities", tuple(m for m in MODALITIES if m in self.modalities)
        )
        if self.fusion == "paper" and self.modalities != MODALITIES:
            raise ValueError(
                "fusion='paper' uses all five modalities; for a modality subset "
                f"{self.modalities!r} choose fusion='concat' (the paper's table 5 "
                "fuses subsets by concatenation), 'add' or 'attention'"
            )

    @property
    def has_adapter(self) -> bool:
        """Whether the model contains the self-adaptive adapter."""
        return self.fusion == "paper" and self.use_adapter

    @property
    def encoded_modalities(self) -> tuple[str, ...]:
        """Modalities whose CLIP embeddings the forward pass computes."""
        return MODALITIES if self.fusion == "paper" else self.modalities

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelConfig":
        """Build from `config.model` of an ml_collections config (extra keys ignored).

        `modalities` may be a sequence or a comma-separated string.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dict(config).items() if k in fields}
        modalities = values.get("modalities")
        if isinstance(modalities, str):
            values["modalities"] = tuple(
                m.strip() for m in modalities.split(",") if m.strip()
            )
        elif modalities is not None:
            values["modalities"] = tuple(modalities)
        return cls(**values)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Scale each row of (batch, d) to unit Euclidean norm (eps avoids 0/0)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class FashionMSA(nn.Module):
    """The multimodal sentiment model over CLIP embeddings.

    Inputs are batch dicts as the input pipeline produces them:
    "{m}/input_ids" and "{m}/attention_mask" int32 (batch, length) for the text
    modalities m, "image" and "pseudo_image" float32 (batch, size, size, 3)
    (CLIP-normalised NHWC), and "has_pseudo" bool (batch,). Only the modalities
    in `config.encoded_modalities` are read. Instead of tokens and pixels, a
    batch may carry the towers' outputs under the keys of EMBEDDING_KEYS (see
    `embed`); `fashion_msa.train.embedding_cache` builds such batches.

    Attributes:
      clip_config: shape of the CLIP towers.
      config: fusion heads and ablation switches.
      dtype: computation dtype of the CLIP towers; the heads compute in float32.
      scan_layers: stack CLIP layers with `nn.scan` (faster compilation).
    """

    clip_config: CLIPConfig
    config: ModelConfig = ModelConfig()
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False

    def setup(self) -> None:
        cfg = self.config
        d = self.clip_config.projection_dim
        self.clip = CLIP(
            self.clip_config, dtype=self.dtype, scan_layers=self.scan_layers
        )

        if cfg.fusion != "paper":
            head_cls = BASELINE_HEADS[cfg.fusion]
            kwargs = dict(
                features=d,
                hidden_dim=cfg.hidden_dim,
                num_classes=cfg.num_classes,
                dropout_rate=cfg.dropout_rate,
            )
            if cfg.fusion == "attention":
                kwargs["num_heads"] = cfg.attention_num_heads
            self.baseline_head = head_cls(**kwargs)
            return

        def fusion() -> Fusion:
            return Fusion(d, cfg.hidden_dim, cfg.dropout_rate)

        self.image_fusion = fusion()
        if not cfg.share_image_fusion:
            self.pseudo_image_fusion = fusion()
        if cfg.use_adapter:
            self.adapter = SelfAdaptiveAdapter(
                d, cfg.adapter_hidden_dim, cfg.dropout_rate
            )
        self.pseudo_fusion = fusion()
        self.final_fusion = fusion()
        self.classifier = nn.Dense(cfg.num_classes)

    def encode(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Run the CLIP towers: (batch, d) float32 projected embeddings, not normalised.

        The text tower runs once on the text-like inputs stacked along the batch,
        up to 3 * batch rows. The vision tower runs once on the images, up to
        2 * batch rows. Each tower thus compiles and runs as one large call.
        The keys are those of EMBEDDING_KEYS for `config.encoded_modalities`.
        """
        modalities = self.config.encoded_modalities
        embeds: dict[str, jax.Array] = {}

        text_like = [m for m in TEXT_MODALITIES if m in modalities]
        if text_like:
            input_ids = jnp.concatenate([batch[f"{m}/input_ids"] for m in text_like])
            attention_mask = jnp.concatenate(
                [batch[f"{m}/attention_mask"] for m in text_like]
            )
            text_out = self.clip.encode_text(input_ids, attention_mask)
            for m, rows in zip(
                text_like, jnp.split(text_out, len(text_like)), strict=True
            ):
                embeds[EMBEDDING_KEYS[m]] = rows

        images = [m for m in IMAGE_MODALITIES if m in modalities]
        if images:
            pixels = jnp.concatenate([batch[m] for m in images])
            image_out = self.clip.encode_image(pixels)
            for m, rows in zip(images, jnp.split(image_out, len(images)), strict=True):
                embeds[EMBEDDING_KEYS[m]] = rows

        return {k: v.astype(jnp.float32) for k, v in embeds.items()}

    def embed(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Return the embeddings the heads fuse, (batch, d) float32 each.

        A batch that carries precomputed tower outputs (every key of
        `embedding_keys`, as `encode` returns them) skips the towers. This is
        the frozen-tower path: parameters without the "clip" collection suffice.
        Otherwise the towers encode the batch's tokens and pixels.
        """
        keys = self.embedding_keys
        present = [k for k in keys if k in batch]
        if present:
            missing = [k for k in keys if k not in batch]
            if missing:
                raise KeyError(
                    f"the batch carries precomputed embeddings {present} but not "
                    f"{missing}; pass all of {list(keys)} or none"
                )
            embeds = {k: batch[k].astype(jnp.float32) for k in keys}
        else:
            embeds = self.encode(batch)
        if self.config.normalize_embeddings:
            embeds = {k: l2_normalize(v) for k, v in embeds.items()}
        return embeds

    @property
    def embedding_keys(self) -> tuple[str, ...]:
        """Keys of the tower outputs the model reads, in MODALITIES order."""
        return tuple(EMBEDDING_KEYS[m] for m in self.config.encoded_modalities)

    def image_representations(
        self, embeds: Mapping[str, jax.Array], *, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """Return the attribute-guided `F_ori` and `F_P`, each (batch, d)."""
        f_ori = self.image_fusion(
            embeds["image_embeds"],
            embeds["attribute_embeds"],
            deterministic=deterministic,
        )
        pseudo_fusion = (
            self.image_fusion
            if self.config.share_image_fusion
            else self.pseudo_image_fusion
        )
        f_pseudo = pseudo_fusion(
            embeds["pseudo_image_embeds"],
            embeds["pseudo_attribute_embeds"],
            deterministic=deterministic,
        )
        return f_ori, f_pseudo

    def consistency(
        self,
        batch: Mapping[str, jax.Array],
        partner: jax.Array,
        *,
        deterministic: bool = True,
    ) -> dict[str, jax.Array]:
        """Score each post's `F_ori` against its partner's `F_P` (adapter pre-training).

        Args:
          batch: a batch dict (see the class docstring).
          partner: int32 (batch,), the row whose pseudo feature each row is paired
            with, e.g. a random permutation of the rows.
          deterministic: disable dropout.

        Returns:
          `consistency_logit` (batch,), `sim` (batch, d) and `partner_has_pseudo`
          (batch,) bool: pairs whose partner has no pseudo data carry no signal.
        """
        if not self.config.has_adapter:
            raise ValueError(
                "adapter pre-training needs fusion='paper' and use_adapter=True"
            )
        embeds = self.embed(batch)
        f_ori, f_pseudo = self.image_representations(
            embeds, deterministic=deterministic
        )
        sim, consistency_logit = self.adapter(
            f_ori, f_pseudo[partner], deterministic=deterministic
        )
        return {
            "consistency_logit": consistency_logit,
            "sim": sim,
            "partner_has_pseudo": batch["has_pseudo"][partner],
        }

    def __call__(
        self, batch: Mapping[str, jax.Array], *, deterministic: bool = True
    ) -> dict[str, jax.Array]:
        """Classify a batch of posts.

        Returns a dict with `logits` (batch, num_classes) and the embeddings
        (batch, d) under the keys of EMBEDDING_KEYS for the encoded modalities.
        The paper fusion adds `f_ori` and `f_pseudo` (batch, d), and, with the
        adapter, `sim` (batch, d) and `consistency_logit` (batch,).
        """
        embeds = self.embed(batch)
        has_pseudo = batch["has_pseudo"].astype(jnp.float32)[:, None]

        if self.config.fusion != "paper":
            features, present = [], []
            ones = jnp.ones(has_pseudo.shape[:1], dtype=bool)
            for m in self.config.modalities:
                feature = embeds[EMBEDDING_KEYS[m]]
                if m in PSEUDO_MODALITIES:
                    feature = feature * has_pseudo
                    present.append(batch["has_pseudo"].astype(bool))
                else:
                    present.append(ones)
                features.append(feature)
            logits = self.baseline_head(features, present, deterministic=deterministic)
            return {"logits": logits, **embeds}

        f_ori, f_pseudo = self.image_representations(
            embeds, deterministic=deterministic
        )
        outputs = {"f_ori": f_ori, "f_pseudo": f_pseudo}
        if self.config.use_adapter:
            sim, consistency_logit = self.adapter(
                f_ori, f_pseudo, deterministic=deterministic
            )
            outputs.update(sim=sim, consistency_logit=consistency_logit)
            f_pseudo_adapted = sim * f_pseudo
        else:
            f_pseudo_adapted = f_pseudo
        # Multiplying by the 0/1 flag instead of branching keeps one traced graph
        # for batches with and without pseudo data.
        f_pseudo_adapted = f_pseudo_adapted * has_pseudo

        text_embeds = embeds["text_embeds"]
        f_pseudo_text = self.pseudo_fusion(
            f_pseudo_adapted, text_embeds, deterministic=deterministic
        )
        fused = self.final_fusion(
            f_pseudo_text, text_embeds, f_ori, deterministic=deterministic
        )
        outputs["logits"] = self.classifier(fused)
        outputs.update(embeds)
        return outputs


def dummy_batch(
    clip_config: CLIPConfig, batch_size: int = 1, text_length: int | None = None
) -> dict[str, jax.Array]:
    """Build an all-zeros batch of the input shapes, for `init` and shape inference."""
    length = text_length or clip_config.text.max_position_embeddings
    size = clip_config.vision.image_size
    batch: dict[str, jax.Array] = {}
    for m in TEXT_MODALITIES:
        batch[f"{m}/input_ids"] = jnp.zeros((batch_size, length), jnp.int32)
        batch[f"{m}/attention_mask"] = jnp.ones((batch_size, length), jnp.int32)
    for m in IMAGE_MODALITIES:
        batch[m] = jnp.zeros((batch_size, size, size, 3), jnp.float32)
    batch["has_pseudo"] = jnp.ones((batch_size,), bool)
    batch["label"] = jnp.zeros((batch_size,), jnp.int32)
    batch["valid"] = jnp.ones((batch_size,), bool)
    return batch


def init_params(
    model: FashionMSA, rng: jax.Array, batch_size: int = 1
) -> dict[str, Any]:
    """Initialise all parameters randomly (jitted); return the "params" collection."""
    batch = dummy_batch(model.clip_config, batch_size)
    variables = jax.jit(model.init)(rng, batch)
    return variables["params"]


def parameter_groups(params: Mapping[str, Any]) -> dict[str, Sequence[str]]:
    """Group top-level parameter names into `tower`, `heads` and `final_fusion`."""
    groups: dict[str, list[str]] = {"tower": [], "heads": [], "final_fusion": []}
    for name in params:
        if name == TOWER_MODULE:
            groups["tower"].append(name)
        elif name in FINAL_FUSION_MODULES:
            groups["final_fusion"].append(name)
        else:
            groups["heads"].append(name)
    return groups
