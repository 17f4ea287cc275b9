"""The self-adaptive adapter: a Siamese network that compares original and pseudo data.

Zhao et al. (COLING 2025, section 3.4, figure 4) describe it. A shared two-layer
MLP `g` maps the original image feature `F_ori` to u and the pseudo image
feature `F_P` to v. A fusion network reads `[u, v, |u - v|, u * v]` and ends in
a sigmoid, which gives the similarity feature `Sim` in (0, 1)^d that gates
`F_P`. A consistency head `Dense(1)(Sim)` gives the logit that adapter
pre-training trains with binary cross-entropy (same sentiment or not).
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from fashion_msa.model.fusion import Fusion


class SiameseBranch(nn.Module):
    """The shared MLP `g`: Dense(hidden_dim) -> GELU -> Dense(features)."""

    features: int
    hidden_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Map (batch, d) to (batch, features)."""
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="hidden")(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(self.features, dtype=self.dtype, name="output")(x)


class SelfAdaptiveAdapter(nn.Module):
    """Compute `Sim` and the consistency logit for pairs of features.

    Attributes:
      features: width of `Sim`; equals the width of `F_P`, which `Sim` gates.
      hidden_dim: hidden width of `g` and of the fusion network.
      dropout_rate: dropout inside the fusion network.
      dtype: computation dtype.
    """

    features: int
    hidden_dim: int
    dropout_rate: float = 0.1
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.branch = SiameseBranch(self.features, self.hidden_dim, dtype=self.dtype)
        self.fusion = Fusion(
            self.features, self.hidden_dim, self.dropout_rate, dtype=self.dtype
        )
        self.consistency_head = nn.Dense(1, dtype=self.dtype)

    def __call__(
        self, f_ori: jax.Array, f_pseudo: jax.Array, *, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """Score each row of `f_ori` (batch, d) against the same row of `f_pseudo`.

        Returns:
          sim: (batch, features), in (0, 1).
          consistency_logit: (batch,), the logit that the pair shares a sentiment.
        """
        u = self.branch(f_ori)
        v = self.branch(f_pseudo)
        sim = nn.sigmoid(
            self.fusion(u, v, jnp.abs(u - v), u * v, deterministic=deterministic)
        )
        consistency_logit = self.consistency_head(sim)[..., 0]
        return sim, consistency_logit
