"""Load and save Hugging Face CLIP checkpoints as Flax parameters for `CLIP`.

Reads a transformers `CLIPModel` directory: `config.json` plus `model.safetensors`,
sharded safetensors with `model.safetensors.index.json`, or `pytorch_model.bin`
(optionally sharded with `pytorch_model.bin.index.json`). Writes
`model.safetensors` and `config.json` in the layout that
`transformers.CLIPModel.from_pretrained` reads.

Flax parameter paths mirror the PyTorch keys, so the conversion is a rename plus two
transposes: a Linear weight `(out, in)` is a Dense kernel `(in, out)`, and the
Conv2d patch weight `(out, in, kh, kw)` is a Conv kernel `(kh, kw, in, out)`.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from absl import logging
from jax.typing import DTypeLike

from fashion_msa.clip.config import CLIPConfig
from fashion_msa.clip.modeling import CLIP, stack_layer_params, unstack_layer_params

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"

# Non-persistent PyTorch buffers that some older checkpoints still contain.
_IGNORED_KEY = re.compile(r".*\.position_ids")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_UNROLLED_LAYER = re.compile(r"layers_(\d+)")
# Flax leaf name -> PyTorch parameter name. Others (class_embedding, logit_scale,
# bias) are the same in both.
_TORCH_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model that its config describes.

    Attributes:
        missing: PyTorch keys the model needs that the checkpoint lacks.
        unexpected: checkpoint keys the model has no parameter for.
        mismatched: `{key: (checkpoint_shape, expected_shape)}` in PyTorch layout.
    """

    def __init__(
        self,
        source: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        lines = [f"{source} does not match the CLIP model its config describes:"]
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(
                f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}"
            )
        for key, (found, expected) in mismatched.items():
            lines.append(f"mis-shaped key {key}: found {found}, expected {expected}")
        super().__init__("\n".join(lines))


def load_pretrained(
    path: str | os.PathLike,
    dtype: DTypeLike = jnp.float32,
    scan_layers: bool = False,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[CLIPConfig, dict[str, Any]]:
    """Load a Hugging Face CLIP checkpoint as `(config, params)` for `CLIP`.

    Args:
        path: a checkpoint directory, or a Hub id (`owner/name`) that is already in
            the local Hugging Face cache. Nothing is downloaded.
        dtype: parameter dtype. Weights stored as float16 or bfloat16 are cast.
        scan_layers: return the encoder layers stacked for `CLIP(...,
            scan_layers=True)`.
        cache_dir: the Hugging Face cache to look Hub ids up in (default: the
            `HF_HUB_CACHE` location).

    Returns:
        The config and the parameter tree (`text_model`, `vision_model`,
        `text_projection`, `visual_projection`, `logit_scale`), to be used as
        `CLIP(config).apply({"params": params}, ...)`.

    Raises:
        FileNotFoundError: no such directory, or no config or weights in it.
        CheckpointMismatchError: missing, unexpected or mis-shaped tensors, all
            named in one message.
    """
    directory = resolve_checkpoint_dir(path, cache_dir=cache_dir)
    config = CLIPConfig.from_pretrained(directory)
    state_dict, source = read_state_dict(directory)
    params = state_dict_to_params(config, state_dict, dtype=dtype, source=source)
    if scan_layers:
        params = stack_layer_params(params)
    params = jax.device_put(params)
    logging.info(
        "Loaded CLIP from %s: %d tensors as %s.",
        source,
        len(jax.tree.leaves(params)),
        jnp.dtype(dtype).name,
    )
    return config, params


def save_pretrained(
    config: CLIPConfig, params: Mapping[str, Any], path: str | os.PathLike
) -> None:
    """Write `model.safetensors` and `config.json` as transformers' `CLIPModel` does.

    Tensors keep the dtype of `params`, so `load_pretrained` with that dtype gives
    back identical values. Stacked (`scan_layers=True`) parameters are unrolled
    first. The directory is created if needed.

    Raises:
        CheckpointMismatchError: `params` does not match `config`.
    """
    params = unstack_layer_params(params)
    flat_params = _flatten(params)
    expected = _expected_torch_shapes(config)
    found = {
        _torch_key(path): _torch_shape(path, leaf.shape)
        for path, leaf in flat_params.items()
    }
    _check_keys("params", found, expected)

    # np.ascontiguousarray would turn the 0-d logit_scale into shape (1,).
    state_dict = {
        _torch_key(path): np.asarray(
            _to_torch_layout(path, np.asarray(leaf)), order="C"
        )
        for path, leaf in flat_params.items()
    }
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    # The same metadata as transformers' own save_pretrained writes.
    safetensors.numpy.save_file(
        state_dict, directory / SAFETENSORS_NAME, metadata={"format": "pt"}
    )

    hf_config = config.to_hf_dict()
    dtypes = {leaf.dtype.name for leaf in state_dict.values()}
    if len(dtypes) == 1:
        hf_config["dtype"] = dtypes.pop()
    with open(directory / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
        f.write("\n")
    logging.info("Saved CLIP (%d tensors) to %s.", len(state_dict), directory)


def resolve_checkpoint_dir(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> pathlib.Path:
    """Return the local directory for a checkpoint path or a cached Hub id.

    A Hub id (`owner/name`) resolves only to a snapshot already in the local
    Hugging Face cache: this never touches the network.
    """
    local = pathlib.Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise NotADirectoryError(
            f"{local} is a file; pass the checkpoint directory that contains "
            f"{CONFIG_NAME} and the weights."
        )
    if not _HUB_ID.fullmatch(str(path)):
        raise FileNotFoundError(f"Checkpoint directory {local} not found.")

    # huggingface_hub comes with transformers; imported here to keep imports light.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(
            str(path), cache_dir=cache_dir, local_files_only=True
        )
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{str(path)!r} is not a local directory, and no snapshot of the Hub "
            "repository with that id is in the local Hugging Face cache "
            f"({cache_dir or 'HF_HUB_CACHE'}). Nothing is downloaded: fetch the "
            "checkpoint with network access and pass its directory."
        ) from e
    return pathlib.Path(snapshot)


def read_state_dict(directory: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
    """Read every tensor of a checkpoint directory in PyTorch layout.

    The first of `model.safetensors`, `model.safetensors.index.json`,
    `pytorch_model.bin`, `pytorch_model.bin.index.json` found is read, the order
    transformers prefers. bfloat16 tensors from `.bin` files come back as float32,
    which represents them exactly.

    Returns:
        `{key: array}` and the file read (for messages).
    """
    if (directory / SAFETENSORS_NAME).is_file():
        file = directory / SAFETENSORS_NAME
        return safetensors.numpy.load_file(file), str(file)
    if (directory / SAFETENSORS_INDEX_NAME).is_file():
        file = directory / SAFETENSORS_INDEX_NAME
        return _read_sharded(file, safetensors.numpy.load_file), str(file)
    if (directory / TORCH_NAME).is_file():
        file = directory / TORCH_NAME
        return _read_torch_file(file), str(file)
    if (directory / TORCH_INDEX_NAME).is_file():
        file = directory / TORCH_INDEX_NAME
        return _read_sharded(file, _read_torch_file), str(file)
    raise FileNotFoundError(
        f"No weights in {directory}: expected {SAFETENSORS_NAME}, "
        f"{SAFETENSORS_INDEX_NAME}, {TORCH_NAME} or {TORCH_INDEX_NAME}."
    )


def state_dict_to_params(
    config: CLIPConfig,
    state_dict: Mapping[str, np.ndarray],
    dtype: DTypeLike = jnp.float32,
    source: str = "checkpoint",
) -> dict[str, Any]:
    """Convert PyTorch-layout tensors to the unrolled Flax parameter tree.

    The leaves are numpy arrays of `dtype` (bfloat16 through ml_dtypes), so that
    stacking for `scan_layers` happens before anything is copied to a device.

    Raises:
        CheckpointMismatchError: missing, unexpected or mis-shaped keys.
    """
    found = {
        key: tuple(array.shape)
        for key, array in state_dict.items()
        if not _IGNORED_KEY.fullmatch(key)
    }
    _check_keys(source, found, _expected_torch_shapes(config))

    params: dict[str, Any] = {}
    for path in _expected_paths(config):
        array = _to_flax_layout(path, np.asarray(state_dict[_torch_key(path)]))
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.asarray(array, dtype=np.dtype(dtype), order="C")
    return params


def _read_sharded(index_file: pathlib.Path, read_shard: Any) -> dict[str, np.ndarray]:
    with open(index_file, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file} has no 'weight_map' object.")
    state_dict: dict[str, np.ndarray] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard_file = index_file.parent / shard_name
        if not shard_file.is_file():
            raise FileNotFoundError(
                f"Shard {shard_file} listed in {index_file} not found."
            )
        state_dict.update(read_shard(shard_file))
    absent = sorted(key for key in weight_map if key not in state_dict)
    if absent:
        raise ValueError(
            f"{index_file} lists keys that its shards do not contain: "
            f"{', '.join(absent)}"
        )
    return state_dict


def _read_torch_file(file: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading {file} needs PyTorch; install torch, or convert the checkpoint "
            "to safetensors."
        ) from e

    state_dict = torch.load(file, map_location="cpu", weights_only=True)
    arrays = {}
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"{file}: entry {key!r} is a {type(tensor).__name__}, not a tensor."
            )
        if tensor.dtype == torch.bfloat16:
            # Tensor.numpy() rejects bfloat16, and float32 represents it exactly.
            tensor = tensor.to(torch.float32)
        arrays[key] = tensor.numpy()
    return arrays


def _check_keys(
    source: str,
    found: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = {
        key: (found[key], expected[key])
        for key in sorted(set(found) & set(expected))
        if tuple(found[key]) != tuple(expected[key])
    }
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)


@functools.lru_cache(maxsize=8)
def _abstract_params(config: CLIPConfig) -> dict[str, Any]:
    text, vision = config.text, config.vision
    input_ids = jax.ShapeDtypeStruct((1, text.max_position_embeddings), jnp.int32)
    pixel_values = jax.ShapeDtypeStruct(
        (1, vision.image_size, vision.image_size, vision.num_channels), jnp.float32
    )
    variables = jax.eval_shape(
        CLIP(config).init, jax.random.key(0), input_ids, input_ids, pixel_values
    )
    return variables["params"]


def _expected_paths(config: CLIPConfig) -> list[tuple[str, ...]]:
    return list(_flatten(_abstract_params(config)))


def _expected_torch_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    return {
        _torch_key(path): _torch_shape(path, leaf.shape)
        for path, leaf in _flatten(_abstract_params(config)).items()
    }


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, name)))
        else:
            flat[(*prefix, name)] = value
    return flat


def _torch_key(path: tuple[str, ...]) -> str:
    parts = []
    for name in path[:-1]:
        match = _UNROLLED_LAYER.fullmatch(name)
        parts.extend(("layers", match.group(1)) if match else (name,))
    parts.append(_TORCH_LEAF_NAMES.get(path[-1], path[-1]))
    return ".".join(parts)


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    if path[-1] == "kernel" and len(shape) == 4:
        kh, kw, c_in, c_out = shape
        return (c_out, c_in, kh, kw)
    return tuple(shape)


def _to_flax_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and array.ndim == 2:
        return array.T
    if path[-1] == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def _to_torch_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and array.ndim == 2:
        return array.T
    if path[-1] == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array
