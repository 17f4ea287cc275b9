"""The basic fusion network: concatenation followed by a two-layer MLP.

Zhao et al. (COLING 2025, section 3.4) build every fusion step of the model from
"two MLP layers and a concatenation". The hidden activation is the exact GELU,
as PyTorch's `nn.GELU()` computes it by default.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn


class Fusion(nn.Module):
    """Concatenate inputs, then Dense(hidden_dim) -> GELU -> Dropout -> Dense(features).

    Attributes:
      features: output width, usually the CLIP projection dimension d.
      hidden_dim: width of the hidden layer.
      dropout_rate: dropout after the activation, active when not deterministic.
      dtype: computation dtype; parameters stay float32.
    """

    features: int
    hidden_dim: int
    dropout_rate: float = 0.1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, *inputs: jax.Array, deterministic: bool = True) -> jax.Array:
        """Fuse k inputs of shape (batch, d_i) into (batch, features)."""
        if not inputs:
            raise ValueError("Fusion needs at least one input")
        x = jnp.concatenate([jnp.asarray(x, self.dtype) for x in inputs], axis=-1)
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="hidden")(x)
        x = nn.gelu(x, approximate=False)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        return nn.Dense(self.features, dtype=self.dtype, name="output")(x)
