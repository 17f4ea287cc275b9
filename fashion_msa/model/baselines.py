"""Baseline fusion heads over the modality features: concatenation, addition, attention.

These are the "traditional" integration methods that Zhao et al. (COLING 2025,
tables 3 and 5) compare against: the CLIP features of the chosen modalities are
fused directly and classified, with no attribute guidance and no adapter.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from fashion_msa.model.fusion import Fusion


class ConcatFusionHead(nn.Module):
    """Fusion(concatenated features) -> Dense(num_classes)."""

    features: int
    hidden_dim: int
    num_classes: int = 3
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(
        self,
        modality_features: list[jax.Array],
        present: list[jax.Array],
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Classify from k features (batch, d); absent ones are already zero."""
        del present
        fused = Fusion(
            self.features, self.hidden_dim, self.dropout_rate, name="fusion"
        )(*modality_features, deterministic=deterministic)
        return nn.Dense(self.num_classes, name="classifier")(fused)


class AddFusionHead(nn.Module):
    """Fusion(sum of features) -> Dense(num_classes)."""

    features: int
    hidden_dim: int
    num_classes: int = 3
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(
        self,
        modality_features: list[jax.Array],
        present: list[jax.Array],
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Classify from the sum of k features (batch, d); absent ones are zero."""
        del present
        summed = sum(modality_features[1:], modality_features[0])
        fused = Fusion(
            self.features, self.hidden_dim, self.dropout_rate, name="fusion"
        )(summed, deterministic=deterministic)
        return nn.Dense(self.num_classes, name="classifier")(fused)


class AttentionFusionHead(nn.Module):
    """Cross-attention from a query to the modality features, then MLP and classifier.

    The query is the first feature (the text feature when text is among the
    modalities) and attends over all k features as tokens, each with a learned
    modality embedding. Features marked absent (pseudo data missing for that post)
    are masked out of the keys. The attended vector and the query are fused by a
    `Fusion` and classified.

    Attributes:
      features: width d of each feature.
      hidden_dim: hidden width of the fusion MLP.
      num_heads: attention heads; must divide `features`.
      num_classes: output classes.
      dropout_rate: dropout in attention and in the MLP.
    """

    features: int
    hidden_dim: int
    num_heads: int = 4
    num_classes: int = 3
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(
        self,
        modality_features: list[jax.Array],
        present: list[jax.Array],
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Classify from k features (batch, d) with per-row presence flags (batch,)."""
        tokens = jnp.stack(modality_features, axis=1)
        modality_embedding = self.param(
            "modality_embedding",
            nn.initializers.normal(stddev=0.02),
            (len(modality_features), self.features),
        )
        tokens = tokens + modality_embedding[None]
        query = tokens[:, :1]
        # (batch, 1 head broadcast, 1 query, k keys)
        key_mask = jnp.stack(present, axis=1)[:, None, None, :]
        attended = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            qkv_features=self.features,
            out_features=self.features,
            dropout_rate=self.dropout_rate,
            name="cross_attention",
        )(query, tokens, mask=key_mask, deterministic=deterministic)[:, 0]
        fused = Fusion(
            self.features, self.hidden_dim, self.dropout_rate, name="fusion"
        )(modality_features[0], attended, deterministic=deterministic)
        return nn.Dense(self.num_classes, name="classifier")(fused)


BASELINE_HEADS = {
    "concat": ConcatFusionHead,
    "add": AddFusionHead,
    "attention": AttentionFusionHead,
}
