"""Trimming the text padding of a training batch leaves the outputs unchanged."""

import dataclasses

import jax
import numpy as np

from configs import demo
from fashion_msa.clip.config import get_preset
from fashion_msa.data import builder
from fashion_msa.model import msa
from fashion_msa.train import padding, trainer

_TINY = get_preset("tiny")
CLIP_CONFIG = dataclasses.replace(
    _TINY,
    text=dataclasses.replace(_TINY.text, hidden_size=32, num_hidden_layers=2),
    vision=dataclasses.replace(
        _TINY.vision, hidden_size=32, num_hidden_layers=1, image_size=32
    ),
    projection_dim=32,
)


def _batch(lengths: dict[str, list[int]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    text = CLIP_CONFIG.text
    batch = {}
    for m, rows in lengths.items():
        ids = np.full((len(rows), 77), text.eos_token_id, np.int32)
        mask = np.zeros((len(rows), 77), np.int32)
        for i, length in enumerate(rows):
            ids[i, 0] = text.bos_token_id
            ids[i, 1 : length - 1] = rng.integers(0, 49406, length - 2)
            mask[i, :length] = 1
        batch[f"{m}/input_ids"], batch[f"{m}/attention_mask"] = ids, mask
    size = CLIP_CONFIG.vision.image_size
    for m in msa.IMAGE_MODALITIES:
        batch[m] = rng.standard_normal((2, size, size, 3), dtype=np.float32)
    batch["has_pseudo"] = np.array([True, False])
    return batch


LENGTHS = {"text": [20, 9], "attributes": [2, 14], "pseudo_attributes": [21, 5]}


def test_trim_batch_text_shared_bucket():
    batch = _batch(LENGTHS)
    trimmed = padding.trim_batch_text(batch, (8, 16, 32, 48, 64, 77))
    for m in msa.TEXT_MODALITIES:
        assert trimmed[f"{m}/input_ids"].shape == (2, 32)
        np.testing.assert_array_equal(
            trimmed[f"{m}/input_ids"], batch[f"{m}/input_ids"][:, :32]
        )
        np.testing.assert_array_equal(
            trimmed[f"{m}/attention_mask"].sum(axis=1), LENGTHS[m]
        )
    assert trimmed["image"] is batch["image"]


def test_trimmed_batch_same_logits():
    model = msa.FashionMSA(CLIP_CONFIG, msa.ModelConfig(hidden_dim=40))
    params = msa.init_params(model, jax.random.key(0))
    batch = _batch(LENGTHS)
    trimmed = padding.trim_batch_text(batch, (16, 32, 77))
    apply = jax.jit(lambda b: model.apply({"params": params}, b))
    with jax.default_matmul_precision("highest"):
        full = apply(batch)
        short = apply(trimmed)
    # The padded keys get attention weight exactly 0, so only the summation
    # order of the shorter matmuls differs: a few float32 ulps.
    for key in ("logits", "text_embeds", "attribute_embeds", "sim"):
        np.testing.assert_allclose(
            np.asarray(short[key]), np.asarray(full[key]), rtol=0, atol=5e-6
        )


def test_training_run_with_text_buckets(tmp_path, monkeypatch):
    lengths = []
    original_trim = padding.trim_batch_text

    def recording_trim(batch, buckets):
        trimmed = original_trim(batch, buckets)
        lengths.append(trimmed["text/input_ids"].shape[1])
        return trimmed

    monkeypatch.setattr(padding, "trim_batch_text", recording_trim)
    data_dir = tmp_path / "data"
    builder.build_dataset(
        "synthetic", tmp_path / "posts", data_dir, num_posts=30, seed=0
    )
    config = demo.get_config()
    config.data.data_dir = str(data_dir)
    config.model.hidden_dim = 32
    config.model.adapter_hidden_dim = 32
    config.model.pretrain_adapter = False
    config.train.batch_size = 8
    config.train.eval_batch_size = 16
    config.train.finetune_epochs = 1
    config.train.progress_bar = False
    config.train.text_length_buckets = (16, 32, 77)
    results = trainer.train_and_evaluate(config, tmp_path / "run")
    assert [stage["name"] for stage in results["stages"]] == ["finetune"]
    assert np.isfinite(results["metrics"]["val"]["loss"])
    # Synthetic posts are short, so every training batch was cut below 77.
    assert lengths
    assert max(lengths) < 77
