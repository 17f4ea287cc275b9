"""Tests of fashion_msa.model: fusion, adapter, the full model and its ablations."""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fashion_msa.clip.config import get_preset
from fashion_msa.clip.modeling import CLIP
from fashion_msa.model import adapter, fusion, msa

# One layer per tower and 32-pixel images keep compilation short; the structure
# (two towers, projections, end-of-text pooling) is the same as at full size.
_TINY = get_preset("tiny")
CLIP_CONFIG = dataclasses.replace(
    _TINY,
    text=dataclasses.replace(_TINY.text, hidden_size=32, num_hidden_layers=1),
    vision=dataclasses.replace(
        _TINY.vision, hidden_size=32, num_hidden_layers=1, image_size=32
    ),
    projection_dim=32,
)
D = CLIP_CONFIG.projection_dim
HIDDEN = 48
BATCH = 4

# float32 on CPU: recomputing the same graph under jit may fuse and reorder
# reductions, which moves results by a few units in the last place.
RTOL, ATOL = 1e-5, 1e-6


def random_batch(seed: int = 0, batch_size: int = BATCH, length: int = 12) -> dict:
    """Random token ids and pixels in the shapes the input pipeline produces."""
    rng = np.random.default_rng(seed)
    size = CLIP_CONFIG.vision.image_size
    batch = {}
    for m in msa.TEXT_MODALITIES:
        ids = rng.integers(0, 49406, size=(batch_size, length), dtype=np.int32)
        ids[:, 0] = 49406
        ids[:, -1] = CLIP_CONFIG.text.eos_token_id
        batch[f"{m}/input_ids"] = ids
        batch[f"{m}/attention_mask"] = np.ones((batch_size, length), np.int32)
    for m in msa.IMAGE_MODALITIES:
        batch[m] = rng.normal(size=(batch_size, size, size, 3)).astype(np.float32)
    batch["has_pseudo"] = np.array([True, False] * (batch_size // 2))
    batch["label"] = rng.integers(0, 3, size=batch_size).astype(np.int32)
    batch["valid"] = np.ones(batch_size, bool)
    return batch


def _model_config(**kwargs) -> msa.ModelConfig:
    return msa.ModelConfig(hidden_dim=HIDDEN, adapter_hidden_dim=HIDDEN, **kwargs)


@functools.cache
def _build(**kwargs):
    """Return (model, params, jitted apply), built once per ModelConfig."""
    model = msa.FashionMSA(CLIP_CONFIG, _model_config(**kwargs))
    params = msa.init_params(model, jax.random.key(0))
    return model, params, jax.jit(model.apply)


def _abstract_params(**kwargs):
    """Return (model, parameter shapes) without compiling or running `init`."""
    model = msa.FashionMSA(CLIP_CONFIG, _model_config(**kwargs))
    return model, jax.eval_shape(lambda: msa.init_params(model, jax.random.key(0)))


@pytest.fixture(scope="module")
def paper_model():
    return _build()


def test_fusion_output_shape():
    module = fusion.Fusion(features=7, hidden_dim=5)
    x = jnp.ones((3, 4))
    y = jnp.ones((3, 6))
    params = module.init(jax.random.key(0), x, y)
    out = module.apply(params, x, y)
    assert out.shape == (3, 7)
    assert params["params"]["hidden"]["kernel"].shape == (10, 5)


def test_fusion_dropout_active_when_not_deterministic():
    module = fusion.Fusion(features=8, hidden_dim=64, dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(1), (2, 8))
    params = module.init(jax.random.key(0), x)
    eval_out = module.apply(params, x)
    train_out = module.apply(
        params, x, deterministic=False, rngs={"dropout": jax.random.key(2)}
    )
    assert not np.allclose(eval_out, train_out)


def test_adapter_sim_in_unit_interval():
    module = adapter.SelfAdaptiveAdapter(features=D, hidden_dim=32)
    # Unit-scale inputs, as the model feeds the adapter; very large inputs would
    # saturate float32's sigmoid at exactly 1.0.
    f_ori = jax.random.normal(jax.random.key(0), (5, D))
    f_pseudo = jax.random.normal(jax.random.key(1), (5, D))
    params = module.init(jax.random.key(2), f_ori, f_pseudo)
    sim, logit = module.apply(params, f_ori, f_pseudo)
    assert sim.shape == (5, D)
    assert logit.shape == (5,)
    assert bool(jnp.all((sim > 0) & (sim < 1)))


def test_adapter_siamese_branch_shared():
    module = adapter.SelfAdaptiveAdapter(features=D, hidden_dim=32)
    f = jnp.ones((1, D))
    params = module.init(jax.random.key(0), f, f)["params"]
    assert set(params) == {"branch", "fusion", "consistency_head"}
    # The fusion network reads [u, v, |u - v|, u * v], four vectors of width D.
    assert params["fusion"]["hidden"]["kernel"].shape[0] == 4 * D


def test_model_outputs(paper_model):
    model, params, apply = paper_model
    out = apply({"params": params}, random_batch())
    expected = {
        "logits": (BATCH, 3),
        "sim": (BATCH, D),
        "consistency_logit": (BATCH,),
        "f_ori": (BATCH, D),
        "f_pseudo": (BATCH, D),
        "text_embeds": (BATCH, D),
        "attribute_embeds": (BATCH, D),
        "pseudo_attribute_embeds": (BATCH, D),
        "image_embeds": (BATCH, D),
        "pseudo_image_embeds": (BATCH, D),
    }
    assert {k: v.shape for k, v in out.items()} == expected
    assert set(params) == {
        "clip",
        "image_fusion",
        "adapter",
        "pseudo_fusion",
        "final_fusion",
        "classifier",
    }


def test_embeddings_unit_norm(paper_model):
    model, params, apply = paper_model
    out = apply({"params": params}, random_batch())
    for key in msa.EMBEDDING_KEYS.values():
        norms = jnp.linalg.norm(out[key], axis=-1)
        np.testing.assert_allclose(norms, 1.0, rtol=RTOL)


def test_embeddings_unnormalised_when_disabled(paper_model):
    _, params, _ = paper_model
    # Normalisation has no parameters, so the paper model's parameters fit.
    model = msa.FashionMSA(CLIP_CONFIG, _model_config(normalize_embeddings=False))
    embed = jax.jit(functools.partial(model.apply, method=msa.FashionMSA.embed))
    batch = random_batch()
    out = embed({"params": params}, batch)
    direct = jax.jit(functools.partial(CLIP(CLIP_CONFIG).apply, method="encode_text"))(
        {"params": params["clip"]},
        batch["text/input_ids"],
        batch["text/attention_mask"],
    )
    np.testing.assert_allclose(out["text_embeds"], direct, rtol=RTOL, atol=ATOL)


def test_one_call_per_tower(paper_model):
    model, params, apply = paper_model
    calls = collections.Counter()

    def count_calls(next_fun, args, kwargs, context):
        if isinstance(context.module, CLIP) and context.method_name in (
            "encode_text",
            "encode_image",
        ):
            calls[context.method_name] += 1
            calls[f"{context.method_name}/rows"] += args[0].shape[0]
        return next_fun(*args, **kwargs)

    # eval_shape traces without compiling, which is when methods run. The fresh
    # lambda avoids a hit in the trace cache of earlier calls of model.apply.
    with nn.intercept_methods(count_calls):
        jax.eval_shape(
            lambda p, b: model.apply(p, b), {"params": params}, random_batch()
        )
    assert calls["encode_text"] == 1
    assert calls["encode_text/rows"] == 3 * BATCH
    assert calls["encode_image"] == 1
    assert calls["encode_image/rows"] == 2 * BATCH


def test_stacked_encoding_matches_separate_calls(paper_model):
    model, params, apply = paper_model
    batch = random_batch()
    out = apply({"params": params}, batch)
    clip = CLIP(CLIP_CONFIG)
    for m in msa.TEXT_MODALITIES:
        separate = clip.apply(
            {"params": params["clip"]},
            batch[f"{m}/input_ids"],
            batch[f"{m}/attention_mask"],
            method="encode_text",
        )
        np.testing.assert_allclose(
            out[msa.EMBEDDING_KEYS[m]], msa.l2_normalize(separate), rtol=RTOL, atol=ATOL
        )
    separate = clip.apply(
        {"params": params["clip"]}, batch["pseudo_image"], method="encode_image"
    )
    np.testing.assert_allclose(
        out["pseudo_image_embeds"], msa.l2_normalize(separate), rtol=RTOL, atol=ATOL
    )


def test_missing_pseudo_data_zeroes_pseudo_branch(paper_model):
    model, params, apply = paper_model
    batch = random_batch()
    batch["has_pseudo"] = np.array([False, True, False, True])
    out = apply({"params": params}, batch)

    # Rows without pseudo data must not depend on their pseudo inputs at all.
    changed = dict(batch)
    rng = np.random.default_rng(9)
    changed["pseudo_image"] = rng.normal(size=batch["pseudo_image"].shape).astype(
        np.float32
    )
    changed["pseudo_attributes/input_ids"] = np.roll(
        batch["pseudo_attributes/input_ids"], 1, axis=1
    )
    out_changed = apply({"params": params}, changed)
    for row in (0, 2):
        np.testing.assert_array_equal(out["logits"][row], out_changed["logits"][row])
    for row in (1, 3):
        assert not np.allclose(out["logits"][row], out_changed["logits"][row])


def test_missing_pseudo_equals_zero_adapted_feature(paper_model):
    """With has_pseudo False, the logits equal the final fusion applied to F_P' = 0."""
    model, params, apply = paper_model
    batch = random_batch()
    batch["has_pseudo"] = np.zeros(BATCH, bool)
    out = apply({"params": params}, batch)

    zeros = jnp.zeros((BATCH, D))
    f_pseudo_text = fusion.Fusion(D, HIDDEN).apply(
        {"params": params["pseudo_fusion"]}, zeros, out["text_embeds"]
    )
    fused = fusion.Fusion(D, HIDDEN).apply(
        {"params": params["final_fusion"]},
        f_pseudo_text,
        out["text_embeds"],
        out["f_ori"],
    )
    logits = nn.Dense(3).apply({"params": params["classifier"]}, fused)
    np.testing.assert_allclose(out["logits"], logits, rtol=RTOL, atol=ATOL)


def test_jit_matches_no_jit(paper_model):
    model, params, apply = paper_model
    batch = random_batch()
    eager = model.apply({"params": params}, batch)
    jitted = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch)
    for key in eager:
        np.testing.assert_allclose(eager[key], jitted[key], rtol=RTOL, atol=ATOL)


def test_consistency_pairs_with_partner(paper_model):
    model, params, apply = paper_model
    batch = random_batch()
    identity = jnp.arange(BATCH)
    partner = jnp.array([1, 0, 3, 2])
    consistency = jax.jit(
        functools.partial(model.apply, method=msa.FashionMSA.consistency)
    )
    paired_self = consistency({"params": params}, batch, identity)
    full = apply({"params": params}, batch)
    np.testing.assert_allclose(
        paired_self["consistency_logit"],
        full["consistency_logit"],
        rtol=RTOL,
        atol=ATOL,
    )
    paired = consistency({"params": params}, batch, partner)
    np.testing.assert_array_equal(
        paired["partner_has_pseudo"], batch["has_pseudo"][np.array([1, 0, 3, 2])]
    )
    assert not np.allclose(paired["consistency_logit"], full["consistency_logit"])


def test_unshared_image_fusion_has_two_modules():
    _, params = _abstract_params(share_image_fusion=False)
    assert "image_fusion" in params
    assert "pseudo_image_fusion" in params


def test_no_adapter_uses_sim_of_ones(paper_model):
    model, shapes = _abstract_params(use_adapter=False)
    assert "adapter" not in shapes
    # The paper model's parameters without the adapter fit this model.
    params = {k: v for k, v in paper_model[1].items() if k != "adapter"}
    batch = random_batch()
    batch["has_pseudo"] = np.ones(BATCH, bool)
    out = jax.jit(model.apply)({"params": params}, batch)
    assert "sim" not in out

    f_pseudo_text = fusion.Fusion(D, HIDDEN).apply(
        {"params": params["pseudo_fusion"]}, out["f_pseudo"], out["text_embeds"]
    )
    fused = fusion.Fusion(D, HIDDEN).apply(
        {"params": params["final_fusion"]},
        f_pseudo_text,
        out["text_embeds"],
        out["f_ori"],
    )
    logits = nn.Dense(3).apply({"params": params["classifier"]}, fused)
    np.testing.assert_allclose(out["logits"], logits, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "fusion_name, modalities, text_rows, image_rows",
    [
        ("concat", ("text",), BATCH, 0),
        ("concat", ("text", "image", "pseudo_image"), BATCH, 2 * BATCH),
        ("add", msa.MODALITIES, 3 * BATCH, 2 * BATCH),
        ("attention", msa.MODALITIES, 3 * BATCH, 2 * BATCH),
        ("attention", ("image", "attributes"), BATCH, BATCH),
    ],
)
def test_baseline_heads(fusion_name, modalities, text_rows, image_rows):
    model, params = _abstract_params(fusion=fusion_name, modalities=modalities)
    rows = collections.Counter()

    def count_rows(next_fun, args, kwargs, context):
        if isinstance(context.module, CLIP) and context.method_name.startswith(
            "encode"
        ):
            rows[context.method_name] += args[0].shape[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(count_rows):
        out = jax.eval_shape(
            lambda p, b: model.apply(p, b), {"params": params}, random_batch()
        )
    assert out["logits"].shape == (BATCH, 3)
    assert rows["encode_text"] == text_rows
    assert rows["encode_image"] == image_rows
    assert set(params) == {"clip", "baseline_head"}
    assert not model.config.has_adapter


def test_baseline_ignores_missing_pseudo_inputs():
    _, params, apply = _build(fusion="attention", modalities=msa.MODALITIES)
    batch = random_batch()
    batch["has_pseudo"] = np.zeros(BATCH, bool)
    changed = dict(batch)
    changed["pseudo_image"] = batch["pseudo_image"] + 1.0
    np.testing.assert_array_equal(
        apply({"params": params}, batch)["logits"],
        apply({"params": params}, changed)["logits"],
    )


def test_model_config_validation():
    with pytest.raises(ValueError, match="fusion must be one of"):
        msa.ModelConfig(fusion="sum")
    with pytest.raises(ValueError, match="subset"):
        msa.ModelConfig(fusion="concat", modalities=("text", "audio"))
    with pytest.raises(ValueError, match="choose fusion='concat'"):
        msa.ModelConfig(fusion="paper", modalities=("text",))


def test_model_config_from_config_string_modalities():
    config = msa.ModelConfig.from_config(
        {"fusion": "concat", "modalities": "image, text", "unrelated": 1}
    )
    assert config.modalities == ("text", "image")
