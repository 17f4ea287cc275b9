"""Build a FashionMSA model and its parameters from an ml_collections `config.model`.

`config.model.clip.checkpoint` names a Hugging Face CLIP checkpoint directory
whose config and weights initialise the towers. When it is empty, the towers are
random, with the shape of `config.model.clip.preset` ("tiny", "vit-b-32").
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from fashion_msa.clip import checkpoint as clip_checkpoint
from fashion_msa.clip.config import CLIPConfig, get_preset
from fashion_msa.model.msa import TOWER_MODULE, FashionMSA, ModelConfig, init_params

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def clip_config_from_config(clip_config: Mapping[str, Any]) -> CLIPConfig:
    """Read the tower shapes from the checkpoint's config.json, else from the preset."""
    if clip_config.get("checkpoint"):
        directory = clip_checkpoint.resolve_checkpoint_dir(clip_config["checkpoint"])
        return CLIPConfig.from_pretrained(directory)
    return get_preset(clip_config["preset"])


def create_model(
    model_config: Mapping[str, Any], clip_config: CLIPConfig | None = None
) -> FashionMSA:
    """Build the Flax module described by `config.model`.

    Args:
      model_config: `config.model` (keys of `ModelConfig`, plus `clip` with
        `preset`, `checkpoint`, `dtype` and `scan_layers`).
      clip_config: tower shapes; read from `model_config.clip` when None.
    """
    clip_section = model_config["clip"]
    if clip_config is None:
        clip_config = clip_config_from_config(clip_section)
    dtype_name = clip_section.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise ValueError(
            f"config.model.clip.dtype must be one of {sorted(DTYPES)}, "
            f"got {dtype_name!r}"
        )
    return FashionMSA(
        clip_config=clip_config,
        config=ModelConfig.from_config(model_config),
        dtype=DTYPES[dtype_name],
        scan_layers=bool(clip_section.get("scan_layers", False)),
    )


def create_params(
    model: FashionMSA, model_config: Mapping[str, Any], rng: jax.Array
) -> dict[str, Any]:
    """Initialise the parameters, taking the CLIP towers from a configured checkpoint.

    Raises:
      ValueError: the checkpoint's parameter tree differs from the model's towers.
    """
    params = init_params(model, rng)
    checkpoint = model_config["clip"].get("checkpoint")
    if not checkpoint:
        logging.info("CLIP towers randomly initialised (no checkpoint configured)")
        return params

    _, clip_params = clip_checkpoint.load_pretrained(
        checkpoint, dtype=jnp.float32, scan_layers=model.scan_layers
    )
    params = merge_tower_params(params, clip_params, source=str(checkpoint))
    logging.info("CLIP towers loaded from %s", checkpoint)
    return params


def merge_tower_params(
    params: Mapping[str, Any], clip_params: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """Replace the model's CLIP towers with `clip_params` after checking their shapes.

    Parts of the checkpoint that the model lacks are dropped: a model that
    encodes no images (a text-only ablation) has no vision tower.

    Raises:
      ValueError: the trees differ, or a tensor has another shape; the message
        names `source`.
    """
    towers = params[TOWER_MODULE]
    clip_params = {k: v for k, v in clip_params.items() if k in towers}
    if jax.tree.structure(clip_params) != jax.tree.structure(towers):
        raise ValueError(
            f"the CLIP checkpoint {source} has a parameter tree that differs "
            "from the model's towers"
        )
    for new, old in zip(
        jax.tree.leaves(clip_params), jax.tree.leaves(towers), strict=True
    ):
        if new.shape != old.shape:
            raise ValueError(
                f"the CLIP checkpoint {source} has a tensor of shape {new.shape} "
                f"where the model expects {old.shape}"
            )
    merged = dict(params)
    merged[TOWER_MODULE] = jax.tree.map(jnp.asarray, clip_params)
    return merged


def count_parameters(params: Any) -> int:
    """Return the total number of scalar parameters."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
