"""Tests of the Flax CLIP modules against transformers' PyTorch CLIPModel.

Each parity test saves a randomly initialised transformers `CLIPModel` to a
temporary directory, loads it with `load_pretrained`, and compares outputs. The
measured maximum differences are printed (`pytest -s` or `-rA` shows them).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fashion_msa.clip.checkpoint import load_pretrained
from fashion_msa.clip.config import CLIPConfig, TextConfig, get_preset
from fashion_msa.clip.modeling import (
    CLIP,
    end_of_text_index,
    stack_layer_params,
    unstack_layer_params,
)

OUTPUT_KEYS = ("text_embeds", "image_embeds", "logits_per_image", "logits_per_text")

# A 1000-token vocabulary keeps the embedding table small. Token layout mimics
# OpenAI's: the start token near the top of the vocabulary, end-of-text at the top.
SMALL_VOCAB = 1000
BOS_ID = 998
EOT_ID = 999
# An end-of-text id in the style of current transformers configs, with ids above
# it (like tokens added to a vocabulary), so "first end-of-text" and "largest id"
# pick different positions.
NEW_EOS_ID = 900
PAD_ID = 1


def tiny_config(hidden_act: str, eos_token_id: int) -> CLIPConfig:
    """Return the "tiny" preset with a small vocabulary and the given text settings.

    The LayerNorm epsilons differ from the 1e-5 default and from each other, so a
    model that ignores the config's epsilon fails the parity tests.
    """
    tiny = get_preset("tiny")
    text = dataclasses.replace(
        tiny.text,
        vocab_size=SMALL_VOCAB,
        bos_token_id=BOS_ID,
        eos_token_id=eos_token_id,
        hidden_act=hidden_act,
        layer_norm_eps=1e-3,
    )
    vision = dataclasses.replace(
        tiny.vision, hidden_act=hidden_act, layer_norm_eps=1e-2
    )
    return dataclasses.replace(tiny, text=text, vision=vision)


def random_hf_clip(config: CLIPConfig, seed: int) -> transformers.CLIPModel:
    """Build a randomly initialised transformers CLIPModel in eval mode."""
    torch.manual_seed(seed)
    hf_config = transformers.CLIPConfig.from_dict(config.to_hf_dict())
    model = transformers.CLIPModel(hf_config).eval()
    # The initialiser sets LayerNorm scales to 1 and biases to 0. Perturbing them
    # makes a swapped or dropped tensor change the outputs.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim <= 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def torch_outputs(
    model: transformers.CLIPModel,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    pixel_values_nhwc: np.ndarray,
) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outputs = model(
            input_ids=torch.from_numpy(input_ids.astype(np.int64)),
            attention_mask=torch.from_numpy(attention_mask.astype(np.int64)),
            pixel_values=torch.from_numpy(pixel_values_nhwc.transpose(0, 3, 1, 2)),
        )
    return {key: getattr(outputs, key).numpy() for key in OUTPUT_KEYS}


def flax_outputs(
    model: CLIP,
    params: dict,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    pixel_values: np.ndarray,
    jit: bool = True,
) -> dict[str, np.ndarray]:
    apply = jax.jit(model.apply) if jit else model.apply
    with jax.default_matmul_precision("highest"):
        outputs = apply({"params": params}, input_ids, attention_mask, pixel_values)
    return {key: np.asarray(value) for key, value in outputs.items()}


def max_differences(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> dict[str, float]:
    return {
        key: float(np.max(np.abs(actual[key].astype(np.float32) - expected[key])))
        for key in expected
    }


def report(name: str, differences: dict[str, float]) -> None:
    figures = ", ".join(f"{key} {value:.3g}" for key, value in differences.items())
    print(f"\n[max abs diff] {name}: {figures}")


def legacy_text_inputs(length: int = 77) -> tuple[np.ndarray, np.ndarray]:
    """Ids for `eos_token_id == 2` configs, where CLIP pools at the largest id.

    Row 0 is padded with end-of-text as OpenAI's tokenizer does, and has a 2 before
    the end, so "first id equal to eos_token_id" would pool elsewhere. Row 1 is
    padded with pad ids and row 2 is unpadded. Row 3 is left-padded with the
    largest id under a masked position, so the pooled query row has every key
    masked.
    """
    rng = np.random.default_rng(0)
    input_ids = rng.integers(3, BOS_ID, size=(4, length)).astype(np.int32)
    attention_mask = np.ones((4, length), np.int32)
    input_ids[:3, 0] = BOS_ID

    input_ids[0, 2] = 2
    input_ids[0, 6:] = EOT_ID
    attention_mask[0, 7:] = 0

    input_ids[1, 20] = EOT_ID
    input_ids[1, 21:] = PAD_ID
    attention_mask[1, 21:] = 0

    input_ids[2, -1] = EOT_ID

    input_ids[3, :2] = (EOT_ID, PAD_ID)
    attention_mask[3, :2] = 0
    input_ids[3, 2] = BOS_ID
    input_ids[3, 9] = EOT_ID - 1
    return input_ids, attention_mask


def new_eos_text_inputs(length: int = 77) -> tuple[np.ndarray, np.ndarray]:
    """Ids for configs whose `eos_token_id` marks the pooled position.

    Rows: ids above the end-of-text id after it, then end-of-text padding; pad-id
    padding with a larger id inside it; unpadded; left-padded.
    """
    rng = np.random.default_rng(1)
    input_ids = rng.integers(3, NEW_EOS_ID, size=(4, length)).astype(np.int32)
    attention_mask = np.ones((4, length), np.int32)
    input_ids[:, 0] = BOS_ID

    input_ids[0, 5] = NEW_EOS_ID
    input_ids[0, 6:8] = (950, 960)
    input_ids[0, 8:] = NEW_EOS_ID
    attention_mask[0, 9:] = 0

    input_ids[1, 12] = NEW_EOS_ID
    input_ids[1, 13:] = PAD_ID
    input_ids[1, 40] = EOT_ID
    attention_mask[1, 13:] = 0

    input_ids[2, -1] = NEW_EOS_ID

    input_ids[3, :3] = PAD_ID
    attention_mask[3, :3] = 0
    input_ids[3, 3] = BOS_ID
    input_ids[3, 30] = NEW_EOS_ID
    return input_ids, attention_mask


def random_pixels(config: CLIPConfig, batch: int, seed: int) -> np.ndarray:
    size = config.vision.image_size
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, size, size, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The tiny quick_gelu model with the new end-of-text rule, loaded from disk."""
    config = tiny_config("quick_gelu", NEW_EOS_ID)
    path = tmp_path_factory.mktemp("tiny_clip")
    random_hf_clip(config, seed=0).save_pretrained(path)
    loaded_config, params = load_pretrained(path)
    input_ids, attention_mask = new_eos_text_inputs()
    pixel_values = random_pixels(config, batch=2, seed=3)
    return loaded_config, params, input_ids, attention_mask, pixel_values


def test_end_of_text_index_rules():
    legacy_ids, _ = legacy_text_inputs()
    np.testing.assert_array_equal(end_of_text_index(legacy_ids, 2), [6, 20, 76, 0])
    new_ids, _ = new_eos_text_inputs()
    np.testing.assert_array_equal(
        end_of_text_index(new_ids, NEW_EOS_ID), [5, 12, 76, 30]
    )
    # Without an end-of-text token transformers pools position 0.
    np.testing.assert_array_equal(end_of_text_index(np.full((1, 5), 7), 9), [0])


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("convention", ["legacy_eos_2", "new_eos"])
def test_tiny_matches_transformers(tmp_path, hidden_act, convention):
    if convention == "legacy_eos_2":
        config = tiny_config(hidden_act, eos_token_id=2)
        input_ids, attention_mask = legacy_text_inputs()
        other_rule = np.argmax(input_ids == 2, axis=-1)
    else:
        config = tiny_config(hidden_act, eos_token_id=NEW_EOS_ID)
        input_ids, attention_mask = new_eos_text_inputs()
        other_rule = np.argmax(input_ids, axis=-1)
    pooled = np.asarray(end_of_text_index(input_ids, config.text.eos_token_id))
    # The inputs must tell the two pooling rules apart, or the test checks one.
    assert (pooled[:2] != other_rule[:2]).all()

    hf_model = random_hf_clip(config, seed=1)
    # Fully masked query rows follow SDPA (zero attention output), not eager.
    assert hf_model.config._attn_implementation == "sdpa"
    hf_model.save_pretrained(tmp_path)
    loaded_config, params = load_pretrained(tmp_path)
    assert loaded_config == config

    pixel_values = random_pixels(config, batch=3, seed=2)
    expected = torch_outputs(hf_model, input_ids, attention_mask, pixel_values)
    actual = flax_outputs(
        CLIP(loaded_config), params, input_ids, attention_mask, pixel_values
    )
    differences = max_differences(actual, expected)
    report(f"tiny {hidden_act} {convention} vs transformers", differences)
    # Both sides run float32 with full-precision matmuls, so only summation order
    # differs: a few float32 ulps of values of size ~1 (logits ~14).
    for key in OUTPUT_KEYS:
        np.testing.assert_allclose(actual[key], expected[key], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def vit_b32_case(tmp_path_factory):
    """A random ViT-B/32-shaped checkpoint on disk and transformers' outputs."""
    config = get_preset("vit-b-32")
    path = tmp_path_factory.mktemp("vit_b32_clip")
    hf_model = random_hf_clip(config, seed=4)
    hf_model.save_pretrained(path)

    input_ids = np.full((2, 77), config.text.eos_token_id, np.int32)
    rng = np.random.default_rng(5)
    input_ids[:, 1:40] = rng.integers(0, config.text.bos_token_id, size=(2, 39))
    input_ids[:, 0] = config.text.bos_token_id
    input_ids[0, 12:] = config.text.eos_token_id
    attention_mask = (np.arange(77)[None] <= np.array([[12], [40]])).astype(np.int32)
    pixel_values = random_pixels(config, batch=2, seed=6)
    expected = torch_outputs(hf_model, input_ids, attention_mask, pixel_values)
    del hf_model
    return path, input_ids, attention_mask, pixel_values, expected


@pytest.mark.parametrize("scan_layers", [False, True])
def test_vit_b32_matches_transformers(vit_b32_case, scan_layers):
    path, input_ids, attention_mask, pixel_values, expected = vit_b32_case
    config, params = load_pretrained(path, scan_layers=scan_layers)
    assert config == get_preset("vit-b-32")

    model = CLIP(config, scan_layers=scan_layers)
    actual = flax_outputs(model, params, input_ids, attention_mask, pixel_values)
    differences = max_differences(actual, expected)
    report(f"vit-b-32 scan_layers={scan_layers} vs transformers", differences)
    # Twelve 512/768-wide float32 layers accumulate more rounding than the tiny
    # model. 1e-4 is still far below the effect of any real mismatch.
    for key in OUTPUT_KEYS:
        np.testing.assert_allclose(actual[key], expected[key], rtol=0, atol=1e-4)


def test_jit_matches_no_jit(tiny_model):
    config, params, input_ids, attention_mask, pixel_values = tiny_model
    model = CLIP(config)
    jitted = flax_outputs(model, params, input_ids, attention_mask, pixel_values[:2])
    with jax.disable_jit():
        eager = flax_outputs(
            model, params, input_ids, attention_mask, pixel_values[:2], jit=False
        )
    differences = max_differences(jitted, eager)
    report("tiny jit vs no-jit", differences)
    # XLA fuses and reorders float32 reductions under jit, so a few ulps of the
    # unit-norm embeddings remain. Logits are exp(logit_scale) ~ 14 times larger.
    for key, atol in (("text_embeds", 1e-6), ("image_embeds", 1e-6)):
        np.testing.assert_allclose(jitted[key], eager[key], rtol=0, atol=atol)
    np.testing.assert_allclose(
        jitted["logits_per_image"], eager["logits_per_image"], rtol=0, atol=2e-5
    )


def test_scan_matches_unrolled(tiny_model):
    config, params, input_ids, attention_mask, pixel_values = tiny_model
    stacked = stack_layer_params(params)
    encoder = stacked["text_model"]["encoder"]
    assert set(encoder) == {"layers"}
    kernel = encoder["layers"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.shape == (config.text.num_hidden_layers, 64, 64)

    scan_model = CLIP(config, scan_layers=True)
    scan_init = jax.eval_shape(
        scan_model.init,
        jax.random.key(0),
        input_ids[:1],
        attention_mask[:1],
        pixel_values[:1],
    )["params"]
    assert jax.tree.structure(scan_init) == jax.tree.structure(stacked)
    assert jax.tree.map(np.shape, scan_init) == jax.tree.map(np.shape, stacked)

    unrolled = flax_outputs(
        CLIP(config), params, input_ids, attention_mask, pixel_values
    )
    scanned = flax_outputs(scan_model, stacked, input_ids, attention_mask, pixel_values)
    differences = max_differences(scanned, unrolled)
    report("tiny scan_layers vs unrolled", differences)
    # The loop body does the same arithmetic, but XLA may fuse it differently.
    for key in OUTPUT_KEYS:
        np.testing.assert_allclose(scanned[key], unrolled[key], rtol=0, atol=1e-6)

    restored = unstack_layer_params(stacked)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for restored_leaf, leaf in zip(
        jax.tree.leaves(restored), jax.tree.leaves(params), strict=True
    ):
        np.testing.assert_array_equal(restored_leaf, leaf)


def test_bfloat16_compute_close_to_float32(tiny_model):
    config, params, input_ids, attention_mask, pixel_values = tiny_model
    reference = flax_outputs(
        CLIP(config), params, input_ids, attention_mask, pixel_values
    )
    bf16_model = CLIP(config, dtype=jnp.bfloat16)
    actual = flax_outputs(bf16_model, params, input_ids, attention_mask, pixel_values)
    differences = max_differences(actual, reference)
    report("tiny bfloat16 compute vs float32", differences)

    text_embeds = bf16_model.apply(
        {"params": params}, input_ids, attention_mask, method="encode_text"
    )
    assert text_embeds.dtype == jnp.bfloat16
    # bfloat16 keeps 8 significand bits (relative step 2**-8 = 0.004). Through two
    # layers the unit-norm embeddings stay within a few of those steps (measured
    # about 0.002). Logits are exp(logit_scale) ~ 14 times larger.
    for key in ("text_embeds", "image_embeds"):
        np.testing.assert_allclose(actual[key], reference[key], rtol=0, atol=1e-2)
    np.testing.assert_allclose(
        actual["logits_per_image"], reference["logits_per_image"], rtol=0, atol=0.15
    )
    # The check must be able to fail: bfloat16 really changed the numbers.
    assert differences["text_embeds"] > 0


def test_bfloat16_params(tiny_model):
    config, _, input_ids, attention_mask, pixel_values = tiny_model
    model = CLIP(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.eval_shape(
        model.init, jax.random.key(0), input_ids, attention_mask, pixel_values
    )
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(params)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_trimmed_ids_match_padded(tiny_model):
    config, params, input_ids, attention_mask, _ = tiny_model
    # Right-padded rows only: trimming removes trailing padding.
    input_ids, attention_mask = input_ids[:2], attention_mask[:2]
    length = int(attention_mask.sum(axis=1).max())
    assert length < config.text.max_position_embeddings

    model = CLIP(config)
    encode = jax.jit(
        lambda ids, mask: model.apply(
            {"params": params}, ids, mask, method="encode_text"
        )
    )
    with jax.default_matmul_precision("highest"):
        full = np.asarray(encode(input_ids, attention_mask))
        trimmed = np.asarray(encode(input_ids[:, :length], attention_mask[:, :length]))
    difference = float(np.max(np.abs(full - trimmed)))
    report("tiny trimmed vs 77-token ids", {"text_embeds (unnormalised)": difference})
    # Causal attention keeps later positions out of the pooled state, so only
    # float32 reduction order over different lengths differs: a few ulps of
    # values up to about 3 (ulp 2.4e-7 between 2 and 4).
    np.testing.assert_allclose(trimmed, full, rtol=0, atol=5e-6)


def test_encoders_callable_from_parent_module(tiny_model):
    config, params, input_ids, attention_mask, pixel_values = tiny_model

    class Parent(nn.Module):
        config: CLIPConfig

        def setup(self):
            self.clip = CLIP(self.config)

        def __call__(self, input_ids, attention_mask, pixel_values):
            text = self.clip.encode_text(input_ids, attention_mask)
            image = self.clip.encode_image(pixel_values)
            return text, image

    text, image = Parent(config).apply(
        {"params": {"clip": params}}, input_ids, attention_mask, pixel_values
    )
    expected_text = CLIP(config).apply(
        {"params": params}, input_ids, attention_mask, method=CLIP.encode_text
    )
    assert text.shape == (input_ids.shape[0], config.projection_dim)
    assert image.shape == (pixel_values.shape[0], config.projection_dim)
    np.testing.assert_array_equal(text, expected_text)


def test_too_long_input_ids_raise(tiny_model):
    config, params, *_ = tiny_model
    input_ids = np.zeros((1, config.text.max_position_embeddings + 1), np.int32)
    with pytest.raises(ValueError, match="78 tokens but the text model has only 77"):
        CLIP(config).apply({"params": params}, input_ids, None, method="encode_text")


def test_wrong_image_size_raises(tiny_model):
    config, params, *_ = tiny_model
    nchw = np.zeros((1, 3, 64, 64), np.float32)
    with pytest.raises(
        ValueError, match=r"must be NHWC with shape \(batch, 64, 64, 3\)"
    ):
        CLIP(config).apply({"params": params}, nchw, method="encode_image")


def test_unsupported_activation_raises():
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        TextConfig(hidden_act="relu")
