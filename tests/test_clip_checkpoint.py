"""Tests of CLIP config reading and checkpoint loading / saving.

Checkpoints are randomly initialised transformers `CLIPModel`s written to
temporary directories in each supported layout.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from fashion_msa.clip.checkpoint import (
    CheckpointMismatchError,
    load_pretrained,
    save_pretrained,
)
from fashion_msa.clip.config import CLIPConfig, TextConfig, VisionConfig, get_preset


def random_hf_clip(config: CLIPConfig, seed: int) -> transformers.CLIPModel:
    """Build a randomly initialised transformers CLIPModel in eval mode."""
    torch.manual_seed(seed)
    hf_config = transformers.CLIPConfig.from_dict(config.to_hf_dict())
    model = transformers.CLIPModel(hf_config).eval()
    # LayerNorm scales start at 1 and biases at 0. Perturbing them makes every
    # tensor distinct, so a swapped pair of keys cannot go unnoticed.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim <= 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def assert_trees_equal(actual: dict, expected: dict) -> None:
    """Assert same structure, dtypes and bit-identical values."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for path, leaf in jax.tree_util.tree_leaves_with_path(actual):
        other = expected
        for key in path:
            other = other[key.key]
        assert leaf.dtype == other.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(
            np.asarray(leaf), np.asarray(other), err_msg=jax.tree_util.keystr(path)
        )


def write_config(config: CLIPConfig, directory) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))


def sample_inputs(config: CLIPConfig) -> dict[str, torch.Tensor]:
    input_ids = torch.full((2, 77), config.text.eos_token_id)
    input_ids[:, 0] = config.text.bos_token_id
    input_ids[0, 1:10] = torch.arange(100, 109)
    input_ids[1, 1:30] = torch.arange(400, 429)
    attention_mask = (torch.arange(77)[None] <= torch.tensor([[10], [30]])).long()
    generator = torch.Generator().manual_seed(0)
    size = config.vision.image_size
    pixel_values = torch.randn(2, 3, size, size, generator=generator)
    return dict(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values
    )


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_clip(get_preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def safetensors_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("safetensors")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(safetensors_dir):
    """`(config, params)` loaded from the plain model.safetensors checkpoint."""
    return load_pretrained(safetensors_dir)


def test_load_renames_and_transposes(hf_model, reference):
    config, params = reference
    assert config == get_preset("tiny")
    state = {key: value.numpy() for key, value in hf_model.state_dict().items()}
    text, vision = params["text_model"], params["vision_model"]
    layer = text["encoder"]["layers_1"]

    q_weight = state["text_model.encoder.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(layer["self_attn"]["q_proj"]["kernel"], q_weight.T)
    np.testing.assert_array_equal(
        layer["layer_norm2"]["scale"],
        state["text_model.encoder.layers.1.layer_norm2.weight"],
    )
    np.testing.assert_array_equal(
        text["embeddings"]["token_embedding"]["embedding"],
        state["text_model.embeddings.token_embedding.weight"],
    )
    patch_weight = state["vision_model.embeddings.patch_embedding.weight"]
    np.testing.assert_array_equal(
        vision["embeddings"]["patch_embedding"]["kernel"],
        patch_weight.transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        vision["pre_layrnorm"]["bias"], state["vision_model.pre_layrnorm.bias"]
    )
    np.testing.assert_array_equal(
        params["visual_projection"]["kernel"], state["visual_projection.weight"].T
    )
    np.testing.assert_array_equal(params["logit_scale"], state["logit_scale"])
    assert len(jax.tree.leaves(params)) == len(state)


def test_saved_checkpoint_loads_in_transformers(hf_model, reference, tmp_path):
    config, params = reference
    save_pretrained(config, params, tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["architectures"] == ["CLIPModel"]
    assert saved_config["model_type"] == "clip"

    reloaded, info = transformers.CLIPModel.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    original_state, reloaded_state = hf_model.state_dict(), reloaded.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    for key, tensor in original_state.items():
        assert torch.equal(reloaded_state[key], tensor), key

    inputs = sample_inputs(config)
    with torch.no_grad():
        original = hf_model(**inputs)
        round_trip = reloaded.eval()(**inputs)
    for key in ("text_embeds", "image_embeds", "logits_per_image"):
        assert torch.equal(getattr(round_trip, key), getattr(original, key)), key


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_load_round_trip_is_bit_identical(safetensors_dir, tmp_path, dtype):
    config, params = load_pretrained(safetensors_dir, dtype=dtype)
    save_pretrained(config, params, tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["dtype"] == jnp.dtype(dtype).name

    config_again, params_again = load_pretrained(tmp_path, dtype=dtype)
    assert config_again == config
    assert_trees_equal(params_again, params)


def test_stacked_params_save_unrolled(reference, safetensors_dir, tmp_path):
    config, params = reference
    _, stacked = load_pretrained(safetensors_dir, scan_layers=True)
    assert set(stacked["vision_model"]["encoder"]) == {"layers"}
    save_pretrained(config, stacked, tmp_path)
    _, params_again = load_pretrained(tmp_path)
    assert_trees_equal(params_again, params)


def test_sharded_safetensors(hf_model, reference, tmp_path):
    # The 49408 x 64 float32 token embedding alone is 12.6 MB, so 5 MB shards
    # split the checkpoint into several files.
    hf_model.save_pretrained(tmp_path, max_shard_size="5MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) >= 2

    _, params = load_pretrained(tmp_path)
    assert_trees_equal(params, reference[1])


def test_pytorch_model_bin(hf_model, reference, tmp_path):
    config, expected = reference
    write_config(config, tmp_path)
    state = dict(hf_model.state_dict())
    # Older checkpoints contain these buffers, and the loader skips them.
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")

    _, params = load_pretrained(tmp_path)
    assert_trees_equal(params, expected)


def test_sharded_pytorch_model_bin(hf_model, reference, tmp_path):
    config, expected = reference
    write_config(config, tmp_path)
    state = hf_model.state_dict()
    keys = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
        "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for name, shard_keys in shards.items():
        torch.save({key: state[key] for key in shard_keys}, tmp_path / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))

    _, params = load_pretrained(tmp_path)
    assert_trees_equal(params, expected)


@pytest.mark.parametrize(
    "file_format, torch_dtype, numpy_dtype",
    [
        ("safetensors", torch.float16, np.float16),
        ("bin", torch.bfloat16, jnp.bfloat16),
    ],
)
def test_half_precision_checkpoint_is_cast(
    hf_model, reference, tmp_path, file_format, torch_dtype, numpy_dtype
):
    config, params = reference
    write_config(config, tmp_path)
    state = {key: value.to(torch_dtype) for key, value in hf_model.state_dict().items()}
    if file_format == "safetensors":
        safetensors.torch.save_file(
            state, tmp_path / "model.safetensors", metadata={"format": "pt"}
        )
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")

    # Half-precision values are exactly representable in float32.
    expected = jax.tree.map(
        lambda x: np.asarray(x).astype(numpy_dtype).astype(np.float32), params
    )
    _, cast = load_pretrained(tmp_path, dtype=jnp.float32)
    assert_trees_equal(cast, expected)

    _, as_bf16 = load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(as_bf16)} == {
        jnp.dtype(jnp.bfloat16)
    }


def corrupt_checkpoint(hf_model, directory, missing=(), unexpected=(), reshaped=()):
    """Write the model's safetensors with keys removed, added or reshaped."""
    state = {key: value.clone() for key, value in hf_model.state_dict().items()}
    for key in missing:
        del state[key]
    for key in unexpected:
        state[key] = torch.zeros(3)
    for key in reshaped:
        state[key] = state[key][:-1].clone()
    write_config(get_preset("tiny"), directory)
    safetensors.torch.save_file(
        state, directory / "model.safetensors", metadata={"format": "pt"}
    )


MISSING_KEY = "text_model.final_layer_norm.weight"
UNEXPECTED_KEY = "text_model.encoder.layers.2.mlp.fc1.weight"
RESHAPED_KEY = "visual_projection.weight"


@pytest.mark.parametrize(
    "fault, message",
    [
        ("missing", f"missing keys (1): {MISSING_KEY}"),
        ("unexpected", f"unexpected keys (1): {UNEXPECTED_KEY}"),
        (
            "reshaped",
            f"mis-shaped key {RESHAPED_KEY}: found (63, 64), expected (64, 64)",
        ),
    ],
)
def test_bad_key_is_named(hf_model, tmp_path, fault, message):
    keys = {
        "missing": MISSING_KEY,
        "unexpected": UNEXPECTED_KEY,
        "reshaped": RESHAPED_KEY,
    }
    corrupt_checkpoint(hf_model, tmp_path, **{fault: [keys[fault]]})
    with pytest.raises(CheckpointMismatchError) as error:
        load_pretrained(tmp_path)
    assert message in str(error.value)


def test_all_bad_keys_in_one_error(hf_model, tmp_path):
    corrupt_checkpoint(
        hf_model,
        tmp_path,
        missing=[MISSING_KEY],
        unexpected=[UNEXPECTED_KEY],
        reshaped=[RESHAPED_KEY],
    )
    with pytest.raises(CheckpointMismatchError) as error:
        load_pretrained(tmp_path)
    assert error.value.missing == [MISSING_KEY]
    assert error.value.unexpected == [UNEXPECTED_KEY]
    assert error.value.mismatched == {RESHAPED_KEY: ((63, 64), (64, 64))}


def test_save_rejects_mismatched_params(reference, tmp_path):
    config, params = reference
    params = dict(params)
    del params["text_projection"]
    with pytest.raises(CheckpointMismatchError, match="text_projection.weight"):
        save_pretrained(config, params, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_hub_id_resolves_from_local_cache(safetensors_dir, reference, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(safetensors_dir, repo / "snapshots" / commit)

    _, params = load_pretrained("someone/tiny-clip", cache_dir=tmp_path)
    assert_trees_equal(params, reference[1])


def test_uncached_hub_id_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        load_pretrained("someone/not-cached", cache_dir=tmp_path)


def test_missing_paths_raise(safetensors_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(tmp_path / "absent")
    with pytest.raises(NotADirectoryError, match="pass the checkpoint directory"):
        load_pretrained(safetensors_dir / "config.json")

    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    shutil.copy(safetensors_dir / "model.safetensors", weights_only)
    with pytest.raises(FileNotFoundError, match="No config.json"):
        load_pretrained(weights_only)

    config_only = tmp_path / "config_only"
    write_config(get_preset("tiny"), config_only)
    with pytest.raises(FileNotFoundError, match="No weights in"):
        load_pretrained(config_only)


def test_vit_b32_preset_is_transformers_default():
    default = transformers.CLIPConfig().to_dict()
    assert CLIPConfig.from_hf_dict(default) == get_preset("vit-b-32")


def test_tiny_preset_shapes():
    tiny = get_preset("tiny")
    assert tiny.text == TextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        eos_token_id=49407,
    )
    assert tiny.vision == VisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
        hidden_act="quick_gelu",
    )
    assert tiny.projection_dim == 64


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="Unknown CLIP preset 'vit-h-14'"):
        get_preset("vit-h-14")


def test_config_round_trips_through_transformers():
    tiny = get_preset("tiny")
    hf_config = transformers.CLIPConfig.from_dict(tiny.to_hf_dict())
    assert hf_config.text_config.hidden_size == 64
    assert hf_config.vision_config.patch_size == 16
    assert hf_config.projection_dim == 64
    assert CLIPConfig.from_hf_dict(hf_config.to_dict()) == tiny
    assert CLIPConfig.from_hf_dict(tiny.to_hf_dict()) == tiny


def test_legacy_config_dicts_override():
    config = CLIPConfig.from_hf_dict(
        {
            "model_type": "clip",
            "projection_dim": 256,
            "text_config": {"hidden_size": 128, "num_attention_heads": 4},
            "text_config_dict": {"hidden_size": 256},
            "vision_config_dict": {"image_size": 336},
        }
    )
    assert config.text.hidden_size == 256
    assert config.text.num_attention_heads == 4
    assert config.text.num_hidden_layers == 12
    assert config.vision.image_size == 336
    assert config.vision.patch_size == 32
    assert config.projection_dim == 256


def test_unknown_config_keys_dropped():
    config = CLIPConfig.from_hf_dict(
        {
            "text_config": {"dropout": 0.1, "initializer_range": 0.5},
            "vision_config": {"id2label": {"0": "a"}, "patch_size": 16},
            "torch_dtype": "float16",
        }
    )
    assert config.text == TextConfig()
    assert config.vision == VisionConfig(patch_size=16)
    assert "dropout" not in config.to_hf_dict()["text_config"]


def test_non_clip_config_raises():
    with pytest.raises(ValueError, match="model_type 'siglip'"):
        CLIPConfig.from_hf_dict({"model_type": "siglip"})
