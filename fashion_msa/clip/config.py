"""CLIP configuration dataclasses, read from and written to Hugging Face config.json.

The fields and their defaults follow transformers' `CLIPConfig`, `CLIPTextConfig`
and `CLIPVisionConfig` (transformers 5.25). Keys that the Flax modules do not use
(dropout, initializer ranges, `id2label`, ...) are dropped on reading, and
`to_hf_dict` writes transformers' defaults for the ones it needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu")

# Older transformers CLIP configs set eos_token_id to 2, which is not the end-of-text
# id. transformers' CLIPTextModel keeps their behaviour, pooling at the largest token
# id, whenever eos_token_id is 2.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Shape and tokens of the CLIP text transformer."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # The model reads only eos_token_id. The others may be None, as transformers allows.
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407
    pad_token_id: int | None = 1

    def __post_init__(self) -> None:
        _validate_tower(self, "text_config")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Shape of the CLIP vision transformer (ViT)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _validate_tower(self, "vision_config")
        if self.patch_size > self.image_size:
            raise ValueError(
                f"vision_config.patch_size ({self.patch_size}) is larger than "
                f"image_size ({self.image_size})."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        # The strided patch convolution drops a remainder, as PyTorch's Conv2d does.
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return self.num_patches + 1


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A two-tower CLIP model: text and vision towers, projections, logit scale."""

    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    def __post_init__(self) -> None:
        _require_int(self.projection_dim, "projection_dim")

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any]) -> CLIPConfig:
        """Build a config from a transformers `CLIPConfig` dictionary.

        Reads the nested `text_config` / `vision_config` entries and lets the legacy
        `text_config_dict` / `vision_config_dict` entries override them, as
        transformers does. Missing keys take transformers' defaults.

        Raises:
            ValueError: `model_type` is not "clip", or a value is invalid.
        """
        model_type = config.get("model_type", "clip")
        if model_type != "clip":
            raise ValueError(
                f"Expected a CLIP config (model_type 'clip'), got model_type "
                f"{model_type!r}; only two-tower CLIPModel checkpoints are supported."
            )
        text = _merge_sub_config(config, "text_config")
        vision = _merge_sub_config(config, "vision_config")
        return cls(
            text=_build_tower(TextConfig, text),
            vision=_build_tower(VisionConfig, vision),
            projection_dim=config.get("projection_dim", 512),
            logit_scale_init_value=float(config.get("logit_scale_init_value", 2.6592)),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> CLIPConfig:
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = pathlib.Path(path)
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise FileNotFoundError(
                f"No config.json found at {config_file}; a Hugging Face CLIP "
                "checkpoint directory contains one beside its weights."
            )
        with open(config_file, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_file} is not valid JSON: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} must contain a JSON object.")
        return cls.from_hf_dict(config)

    def to_hf_dict(self) -> dict[str, Any]:
        """Return the config as a transformers `CLIPConfig` dictionary.

        `projection_dim` is also written into both sub-configs so that
        `CLIPTextModelWithProjection` and `CLIPVisionModelWithProjection` read the
        same value from this file.
        """
        text = dataclasses.asdict(self.text)
        text.update(model_type="clip_text_model", projection_dim=self.projection_dim)
        vision = dataclasses.asdict(self.vision)
        vision.update(
            model_type="clip_vision_model", projection_dim=self.projection_dim
        )
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "initializer_factor": 1.0,
            "text_config": text,
            "vision_config": vision,
        }


def _merge_sub_config(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    sub_config = config.get(key) or {}
    legacy = config.get(f"{key}_dict") or {}
    for name, value in ((key, sub_config), (f"{key}_dict", legacy)):
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be a JSON object, got {value!r}.")
    return {**sub_config, **legacy}


def _build_tower(cls: type, values: Mapping[str, Any]) -> Any:
    known = {field.name for field in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in values.items() if name in known})


def _require_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}.")


_OPTIONAL_TOKEN_IDS = ("bos_token_id", "pad_token_id")


def _validate_tower(config: TextConfig | VisionConfig, prefix: str) -> None:
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "hidden_act":
            if value not in SUPPORTED_ACTIVATIONS:
                raise ValueError(
                    f"{prefix}.hidden_act {value!r} is not supported; expected one "
                    f"of {SUPPORTED_ACTIVATIONS}."
                )
        elif field.name == "layer_norm_eps":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(
                    f"{prefix}.layer_norm_eps must be a number, got {value!r}."
                )
        elif not (value is None and field.name in _OPTIONAL_TOKEN_IDS):
            _require_int(value, f"{prefix}.{field.name}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"{prefix}.hidden_size ({config.hidden_size}) is not a multiple of "
            f"num_attention_heads ({config.num_attention_heads})."
        )


PRESETS: dict[str, CLIPConfig] = {
    # Small enough for unit tests and the CPU demo, with the real 49408-token CLIP
    # vocabulary so that the real tokenizer's ids are valid.
    "tiny": CLIPConfig(
        text=TextConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        vision=VisionConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        projection_dim=64,
    ),
    # The shapes of openai/clip-vit-base-patch32, which are transformers' defaults.
    "vit-b-32": CLIPConfig(),
}


def get_preset(name: str) -> CLIPConfig:
    """Return the preset config called `name` ("tiny" or "vit-b-32")."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"Unknown CLIP preset {name!r}; expected one of {sorted(PRESETS)}."
        ) from None
