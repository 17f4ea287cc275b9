"""Building the model from config.model, with CLIP towers from a checkpoint."""

import jax
import ml_collections
import numpy as np
import pytest
from test_model import CLIP_CONFIG

from fashion_msa.clip import checkpoint as clip_checkpoint
from fashion_msa.clip.modeling import CLIP
from fashion_msa.model import factory


def _model_section(checkpoint: str = "", **kwargs) -> ml_collections.ConfigDict:
    section = ml_collections.ConfigDict(
        {
            "clip": {
                "preset": "tiny",
                "checkpoint": checkpoint,
                "dtype": "float32",
                "scan_layers": False,
            },
            "hidden_dim": 16,
            "adapter_hidden_dim": 16,
            "fusion": "paper",
            "modalities": "text,image,attributes,pseudo_image,pseudo_attributes",
        }
    )
    section.update(kwargs)
    return section


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory):
    """A random CLIP of the small test shapes, saved as a Hugging Face checkpoint."""
    params = jax.jit(CLIP(CLIP_CONFIG).init)(
        jax.random.key(7),
        np.zeros((1, 8), np.int32),
        np.ones((1, 8), np.int32),
        np.zeros((1, 32, 32, 3), np.float32),
    )["params"]
    directory = tmp_path_factory.mktemp("clip")
    clip_checkpoint.save_pretrained(CLIP_CONFIG, params, directory)
    return directory, jax.device_get(params)


@pytest.fixture(scope="module")
def paper_model(saved_clip):
    directory, _ = saved_clip
    section = _model_section(str(directory))
    return section, factory.create_model(section)


def test_checkpoint_sets_tower_shapes_and_weights(saved_clip, paper_model):
    _, clip_params = saved_clip
    section, model = paper_model
    assert model.clip_config == CLIP_CONFIG
    params = factory.create_params(model, section, jax.random.key(0))
    expected = jax.tree.leaves(clip_params)
    loaded = jax.tree.leaves(params["clip"])
    assert len(expected) == len(loaded)
    for want, got in zip(expected, loaded, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_text_only_model_loads_only_text_tower(saved_clip):
    directory, clip_params = saved_clip
    section = _model_section(str(directory), fusion="concat", modalities="text")
    model = factory.create_model(section)
    params = factory.create_params(model, section, jax.random.key(0))
    assert "vision_model" not in params["clip"]
    np.testing.assert_array_equal(
        params["clip"]["text_projection"]["kernel"],
        clip_params["text_projection"]["kernel"],
    )


def test_checkpoint_of_other_shape_rejected(saved_clip):
    _, clip_params = saved_clip
    model_params = {"clip": clip_params, "classifier": {}}
    wrong = jax.tree.map(np.array, clip_params)
    wrong["text_projection"]["kernel"] = np.zeros((32, 48), np.float32)
    with pytest.raises(ValueError, match=r"shape \(32, 48\)"):
        factory.merge_tower_params(model_params, wrong, source="ckpt")


def test_checkpoint_with_missing_tensor_rejected(saved_clip):
    _, clip_params = saved_clip
    model_params = {"clip": clip_params}
    partial = dict(clip_params)
    del partial["visual_projection"]
    with pytest.raises(ValueError, match="tree that differs"):
        factory.merge_tower_params(model_params, partial, source="ckpt")


def test_missing_checkpoint_directory_raises(tmp_path):
    section = _model_section(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError):
        factory.create_model(section)


def test_unknown_dtype_rejected():
    section = _model_section()
    section.clip.dtype = "float16"
    with pytest.raises(ValueError, match="dtype"):
        factory.create_model(section)
