"""Flax linen CLIP: text transformer, vision transformer and the two-tower model.

A port of transformers' PyTorch `CLIPModel` (transformers 5.25,
`models/clip/modeling_clip.py`). Parameter names mirror the PyTorch checkpoint
(`text_model/encoder/layers_0/self_attn/q_proj/kernel` is
`text_model.encoder.layers.0.self_attn.q_proj.weight`), so loading a checkpoint is a
rename table plus transposes (see `fashion_msa.clip.checkpoint`).

Differences from the PyTorch model:
- Images are NHWC, `(batch, height, width, channels)`.
- There is no dropout. CLIP checkpoints set `attention_dropout` to 0.
- Position embeddings are not interpolated, so images must be `image_size` square.
- With a compute dtype below float32 (bfloat16), every matmul accumulates in
  float32, and the attention softmax runs in float32.
- `scan_layers=True` stores the encoder layers stacked under `encoder/layers` with a
  leading layer axis. `stack_layer_params` and `unstack_layer_params` convert
  between the two layouts.

Attention masking follows transformers' default SDPA attention. A query row whose
keys are all masked (attention_mask is 0 at every position up to it, as with left
padding) gets a zero attention output, where transformers' eager attention would
average over every key. Only that row's own hidden state differs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from fashion_msa.clip.config import (
    LEGACY_EOS_TOKEN_ID,
    CLIPConfig,
    TextConfig,
    VisionConfig,
)

TowerConfig = TextConfig | VisionConfig


def quick_gelu(x: jax.Array) -> jax.Array:
    """Apply the sigmoid approximation of GELU that OpenAI's CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    """Apply the exact (erf) GELU, transformers' "gelu"."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": gelu,
}


def float32_accumulation(dtype: DTypeLike) -> Callable[..., jax.Array] | None:
    """Return a `dot_general` for `nn.Dense` that sums products in float32.

    In float32 this is None, Dense's default. For a lower compute dtype such
    as bfloat16, the product of the low-precision operands is accumulated in
    float32 and rounded to `dtype` once, the usual mixed-precision recipe.
    On XLA's CPU backend this is also the fast bfloat16 kernel: a
    bfloat16 x bfloat16 -> float32 matmul runs about twice as fast as one
    that returns bfloat16 (see benchmarks/README.md).
    """
    if jnp.dtype(dtype) == jnp.float32:
        return None

    def dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
        kwargs["preferred_element_type"] = jnp.float32
        out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, **kwargs)
        return out.astype(jnp.result_type(lhs, rhs))

    return dot_general


def _einsum(subscripts: str, *operands: jax.Array, out_dtype: DTypeLike) -> jax.Array:
    """`jnp.einsum` accumulating in float32, the result cast to `out_dtype`."""
    out = jnp.einsum(subscripts, *operands, preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections.

    Attributes:
        config: the tower's config.
        dtype: compute dtype. The softmax runs in float32 whatever this is.
        param_dtype: parameter dtype.
    """

    config: TowerConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def setup(self) -> None:
        dense = lambda: nn.Dense(  # noqa: E731
            self.config.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            dot_general=float32_accumulation(self.dtype),
        )
        self.q_proj = dense()
        self.k_proj = dense()
        self.v_proj = dense()
        self.out_proj = dense()

    def __call__(
        self, hidden_states: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Attend over the sequence.

        Args:
            hidden_states: `(batch, length, hidden)`.
            attention_mask: boolean `(batch, 1, length, length)`, True where the
                query (axis 2) may attend to the key (axis 3), or None for full
                attention.

        Returns:
            `(batch, length, hidden)`.
        """
        batch, length, _ = hidden_states.shape
        heads_shape = (batch, length, self.config.num_attention_heads, -1)
        query = self.q_proj(hidden_states).reshape(heads_shape)
        key = self.k_proj(hidden_states).reshape(heads_shape)
        value = self.v_proj(hidden_states).reshape(heads_shape)

        # Scaling after the product, as transformers does.
        scores = _einsum("bqhd,bkhd->bhqk", query, key, out_dtype=jnp.float32)
        scores = scores * self.config.head_dim**-0.5
        if attention_mask is None:
            weights = jax.nn.softmax(scores, axis=-1)
        else:
            # A finite fill keeps fully masked rows free of NaN, and exp() of it
            # underflows to exactly 0 next to any unmasked score.
            scores = jnp.where(attention_mask, scores, jnp.finfo(jnp.float32).min)
            weights = jax.nn.softmax(scores, axis=-1)
            weights = jnp.where(
                attention_mask.any(axis=-1, keepdims=True), weights, 0.0
            )

        context = _einsum(
            "bhqk,bkhd->bqhd",
            weights.astype(self.dtype),
            value,
            out_dtype=self.dtype,
        )
        return self.out_proj(context.reshape(batch, length, -1))


class CLIPMLP(nn.Module):
    """The feed-forward block: fc1, activation, fc2."""

    config: TowerConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def setup(self) -> None:
        self.fc1 = nn.Dense(
            self.config.intermediate_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            dot_general=float32_accumulation(self.dtype),
        )
        self.fc2 = nn.Dense(
            self.config.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            dot_general=float32_accumulation(self.dtype),
        )
        self.activation = ACTIVATIONS[self.config.hidden_act]

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class CLIPEncoderLayer(nn.Module):
    """A pre-LayerNorm transformer block: attention and MLP, each with a residual."""

    config: TowerConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def setup(self) -> None:
        kwargs = dict(
            config=self.config, dtype=self.dtype, param_dtype=self.param_dtype
        )
        self.self_attn = CLIPAttention(**kwargs)
        self.layer_norm1 = _layer_norm(self.config, self.dtype, self.param_dtype)
        self.mlp = CLIPMLP(**kwargs)
        self.layer_norm2 = _layer_norm(self.config, self.dtype, self.param_dtype)

    def __call__(
        self, hidden_states: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Map `(batch, length, hidden)` to `(batch, length, hidden)`."""
        hidden_states = hidden_states + self.self_attn(
            self.layer_norm1(hidden_states), attention_mask
        )
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class _ScanBodyLayer(CLIPEncoderLayer):
    """An encoder layer with the `(carry, x) -> (carry, y)` signature of nn.scan."""

    def __call__(  # type: ignore[override]
        self, hidden_states: jax.Array, attention_mask: jax.Array | None
    ) -> tuple[jax.Array, None]:
        return super().__call__(hidden_states, attention_mask), None


class CLIPEncoder(nn.Module):
    """`num_hidden_layers` encoder layers, unrolled or scanned over depth.

    Attributes:
        scan_layers: run one layer body with nn.scan (parameters stacked under
            `layers` with a leading layer axis) in place of `layers_0` ...
            `layers_{n-1}`. Outputs match the unrolled stack up to float
            rounding, and compile time is lower.
    """

    config: TowerConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    scan_layers: bool = False

    def setup(self) -> None:
        kwargs = dict(
            config=self.config, dtype=self.dtype, param_dtype=self.param_dtype
        )
        if self.scan_layers:
            scanned_layer = nn.scan(
                _ScanBodyLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=self.config.num_hidden_layers,
            )
            self.layers = scanned_layer(**kwargs)
        else:
            self.layers = [
                CLIPEncoderLayer(**kwargs) for _ in range(self.config.num_hidden_layers)
            ]

    def __call__(
        self, hidden_states: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Map `(batch, length, hidden)` to `(batch, length, hidden)`."""
        if self.scan_layers:
            hidden_states, _ = self.layers(hidden_states, attention_mask)
            return hidden_states
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)
        return hidden_states


class CLIPTextEmbeddings(nn.Module):
    """Token embeddings plus learned absolute position embeddings."""

    config: TextConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def setup(self) -> None:
        kwargs = dict(
            features=self.config.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
        )
        self.token_embedding = nn.Embed(self.config.vocab_size, **kwargs)
        self.position_embedding = nn.Embed(
            self.config.max_position_embeddings, **kwargs
        )

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """Embed `(batch, length)` ids as `(batch, length, hidden)`.

        `length` may be below `max_position_embeddings`, and then the first `length`
        position embeddings are used.
        """
        length = input_ids.shape[-1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {length} tokens but the text model has only "
                f"{self.config.max_position_embeddings} position embeddings."
            )
        positions = self.position_embedding(jnp.arange(length))
        return self.token_embedding(input_ids) + positions[None]


class CLIPVisionEmbeddings(nn.Module):
    """Patch embeddings from a strided convolution, a class token and positions."""

    config: VisionConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def setup(self) -> None:
        hidden_size = self.config.hidden_size
        self.class_embedding = self.param(
            "class_embedding",
            nn.initializers.normal(hidden_size**-0.5),
            (hidden_size,),
            self.param_dtype,
        )
        patch = (self.config.patch_size, self.config.patch_size)
        self.patch_embedding = nn.Conv(
            hidden_size,
            kernel_size=patch,
            strides=patch,
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.position_embedding = nn.Embed(
            self.config.num_positions,
            hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """Embed `(batch, image_size, image_size, channels)` images.

        Returns:
            `(batch, 1 + num_patches, hidden)`, the class token first.
        """
        expected = (
            self.config.image_size,
            self.config.image_size,
            self.config.num_channels,
        )
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
            raise ValueError(
                f"pixel_values must be NHWC with shape (batch, {expected[0]}, "
                f"{expected[1]}, {expected[2]}), got {pixel_values.shape}."
            )
        batch = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.astype(self.dtype))
        patches = patches.reshape(batch, -1, self.config.hidden_size)
        class_token = jnp.broadcast_to(
            self.class_embedding.astype(self.dtype), (batch, 1, self.config.hidden_size)
        )
        embeddings = jnp.concatenate([class_token, patches], axis=1)
        positions = self.position_embedding(jnp.arange(self.config.num_positions))
        return embeddings + positions[None]


class CLIPTextTransformer(nn.Module):
    """The CLIP text tower: embeddings, causal encoder, final LayerNorm, pooling."""

    config: TextConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    scan_layers: bool = False

    def setup(self) -> None:
        kwargs = dict(
            config=self.config, dtype=self.dtype, param_dtype=self.param_dtype
        )
        self.embeddings = CLIPTextEmbeddings(**kwargs)
        self.encoder = CLIPEncoder(**kwargs, scan_layers=self.scan_layers)
        self.final_layer_norm = _layer_norm(self.config, self.dtype, self.param_dtype)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Encode token ids.

        Args:
            input_ids: `(batch, length)` integer ids, `length <=
                max_position_embeddings`.
            attention_mask: `(batch, length)`, 1 for tokens and 0 for padding, or
                None when nothing is padded. It is combined with the causal mask.

        Returns:
            last_hidden_state `(batch, length, hidden)` after the final LayerNorm,
            and pooled_output `(batch, hidden)`: the state at the end-of-text token.
        """
        length = input_ids.shape[-1]
        mask = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] > 0)

        hidden_states = self.embeddings(input_ids)
        hidden_states = self.encoder(hidden_states, mask)
        last_hidden_state = self.final_layer_norm(hidden_states)

        eos_index = end_of_text_index(input_ids, self.config.eos_token_id)
        pooled_output = jnp.take_along_axis(
            last_hidden_state, eos_index[:, None, None], axis=1
        )[:, 0]
        return last_hidden_state, pooled_output


class CLIPVisionTransformer(nn.Module):
    """The CLIP ViT: patch embeddings, encoder, LayerNorm on the class token."""

    config: VisionConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    scan_layers: bool = False

    def setup(self) -> None:
        kwargs = dict(
            config=self.config, dtype=self.dtype, param_dtype=self.param_dtype
        )
        self.embeddings = CLIPVisionEmbeddings(**kwargs)
        # "layrnorm" is the spelling of the PyTorch checkpoint key.
        self.pre_layrnorm = _layer_norm(self.config, self.dtype, self.param_dtype)
        self.encoder = CLIPEncoder(**kwargs, scan_layers=self.scan_layers)
        self.post_layernorm = _layer_norm(self.config, self.dtype, self.param_dtype)

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encode `(batch, image_size, image_size, channels)` CLIP-normalised images.

        Returns:
            last_hidden_state `(batch, 1 + num_patches, hidden)` (before the post
            LayerNorm, as transformers returns it), and pooled_output
            `(batch, hidden)`: the class token after the post LayerNorm.
        """
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values))
        last_hidden_state = self.encoder(hidden_states)
        pooled_output = self.post_layernorm(last_hidden_state[:, 0])
        return last_hidden_state, pooled_output


class CLIP(nn.Module):
    """Two-tower CLIP with bias-free projections and a learned logit scale.

    `encode_text` and `encode_image` can be called from a parent module that has
    this one as a submodule, or through `apply(..., method="encode_text")`.

    Attributes:
        config: the model config.
        dtype: compute dtype (float32 or bfloat16).
        param_dtype: parameter dtype.
        scan_layers: scan the encoder layers over depth (see `CLIPEncoder`).
    """

    config: CLIPConfig
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32
    scan_layers: bool = False

    def setup(self) -> None:
        kwargs = dict(
            dtype=self.dtype, param_dtype=self.param_dtype, scan_layers=self.scan_layers
        )
        self.text_model = CLIPTextTransformer(self.config.text, **kwargs)
        self.vision_model = CLIPVisionTransformer(self.config.vision, **kwargs)
        projection = lambda: nn.Dense(  # noqa: E731
            self.config.projection_dim,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            dot_general=float32_accumulation(self.dtype),
        )
        self.text_projection = projection()
        self.visual_projection = projection()
        self.logit_scale = self.param(
            "logit_scale",
            nn.initializers.constant(self.config.logit_scale_init_value),
            (),
            self.param_dtype,
        )

    def encode_text(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Return projected, unnormalised `(batch, projection_dim)` text embeddings.

        Args:
            input_ids: `(batch, length)` ids; `length` may be shorter than 77 when
                trailing padding was trimmed.
            attention_mask: `(batch, length)`, 1 for tokens, 0 for padding.
        """
        _, pooled_output = self.text_model(input_ids, attention_mask)
        return self.text_projection(pooled_output)

    def encode_image(self, pixel_values: jax.Array) -> jax.Array:
        """Return projected, unnormalised `(batch, projection_dim)` image embeddings.

        Args:
            pixel_values: `(batch, image_size, image_size, 3)` CLIP-normalised NHWC.
        """
        _, pooled_output = self.vision_model(pixel_values)
        return self.visual_projection(pooled_output)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        pixel_values: jax.Array,
    ) -> dict[str, jax.Array]:
        """Embed texts and images and score every pair.

        Returns:
            A dict with float32 entries: `text_embeds` `(n_text, projection_dim)`
            and `image_embeds` `(n_image, projection_dim)`, both L2-normalised;
            `logits_per_image` `(n_image, n_text)` and `logits_per_text`
            `(n_text, n_image)`, cosine similarities times exp(logit_scale).
        """
        text_embeds = self.encode_text(input_ids, attention_mask).astype(jnp.float32)
        image_embeds = self.encode_image(pixel_values).astype(jnp.float32)
        text_embeds = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
        image_embeds = image_embeds / jnp.linalg.norm(
            image_embeds, axis=-1, keepdims=True
        )

        logit_scale = jnp.exp(self.logit_scale.astype(jnp.float32))
        logits_per_text = text_embeds @ image_embeds.T * logit_scale
        return {
            "text_embeds": text_embeds,
            "image_embeds": image_embeds,
            "logits_per_image": logits_per_text.T,
            "logits_per_text": logits_per_text,
        }


def end_of_text_index(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Return the `(batch,)` position that CLIP pools for each `(batch, length)` row.

    With the legacy `eos_token_id == 2` this is the position of the largest id,
    because the end-of-text id is the largest in OpenAI's vocabulary. Otherwise it
    is the first position equal to `eos_token_id`, or 0 when a row has none. Both
    rules and the fallback are those of transformers' `CLIPTextModel`.
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


def _layer_norm(
    config: TowerConfig, dtype: DTypeLike, param_dtype: DTypeLike
) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
    )


_UNROLLED_LAYER = re.compile(r"layers_(\d+)")


def stack_layer_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Convert unrolled encoder parameters to the `scan_layers=True` layout.

    Every `encoder` subtree at any depth (so a parent module's tree works too) has
    its `layers_0` ... `layers_{n-1}` replaced by one `layers` subtree whose leaves
    carry a leading axis of size n. Trees already stacked are returned unchanged.
    """

    def convert(encoder: Mapping[str, Any]) -> dict[str, Any]:
        indices = {}
        others = {}
        for name, value in encoder.items():
            match = _UNROLLED_LAYER.fullmatch(name)
            if match:
                indices[int(match.group(1))] = value
            else:
                others[name] = value
        if not indices:
            return dict(encoder)
        if sorted(indices) != list(range(len(indices))):
            raise ValueError(
                f"Encoder layers must be numbered 0..n-1, got {sorted(indices)}."
            )
        if "layers" in others:
            raise ValueError("Encoder has both stacked and unrolled layers.")
        layers = [indices[i] for i in range(len(indices))]
        others["layers"] = jax.tree.map(_stack, *layers)
        return others

    return _map_encoders(params, convert)


def unstack_layer_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Convert `scan_layers=True` encoder parameters to the unrolled layout.

    The inverse of `stack_layer_params`. Trees already unrolled are returned
    unchanged.
    """

    def convert(encoder: Mapping[str, Any]) -> dict[str, Any]:
        if "layers" not in encoder:
            return dict(encoder)
        others = {name: value for name, value in encoder.items() if name != "layers"}
        stacked = encoder["layers"]
        depths = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
        if len(depths) != 1:
            raise ValueError(
                f"Stacked encoder layers disagree on the layer axis size: {depths}."
            )
        (depth,) = depths
        for i in range(depth):
            others[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
        return others

    return _map_encoders(params, convert)


def _stack(*arrays: Any) -> Any:
    # numpy trees (a checkpoint being loaded) stay on the host.
    if all(isinstance(array, np.ndarray) for array in arrays):
        return np.stack(arrays)
    return jnp.stack(arrays)


def _map_encoders(
    tree: Mapping[str, Any],
    convert: Callable[[Mapping[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    result = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            value = (
                convert(value) if name == "encoder" else _map_encoders(value, convert)
            )
        result[name] = value
    return result
