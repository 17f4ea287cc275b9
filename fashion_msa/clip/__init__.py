"""CLIP in Flax: the two towers, Hugging Face checkpoints, tokenizer, preprocessing.

The modules reproduce transformers' PyTorch `CLIPModel` numerically. Parameter
names mirror the PyTorch state dict, so a Hugging Face CLIP directory loads
through a rename table (`load_pretrained`) and saves back (`save_pretrained`).
"""

from fashion_msa.clip.checkpoint import (
    CheckpointMismatchError,
    load_pretrained,
    save_pretrained,
)
from fashion_msa.clip.config import CLIPConfig, TextConfig, VisionConfig, get_preset
from fashion_msa.clip.image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    ImageDecodeError,
    decode_image,
    preprocess_image,
)
from fashion_msa.clip.modeling import (
    CLIP,
    CLIPTextTransformer,
    CLIPVisionTransformer,
    stack_layer_params,
    unstack_layer_params,
)
from fashion_msa.clip.tokenizer import (
    CLIPTextTokenizer,
    build_vocab_files,
    load_tokenizer,
    trim_padding,
)

__all__ = [
    "CLIP",
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPConfig",
    "CLIPTextTokenizer",
    "CLIPTextTransformer",
    "CLIPVisionTransformer",
    "CheckpointMismatchError",
    "ImageDecodeError",
    "TextConfig",
    "VisionConfig",
    "build_vocab_files",
    "decode_image",
    "get_preset",
    "load_pretrained",
    "load_tokenizer",
    "preprocess_image",
    "save_pretrained",
    "stack_layer_params",
    "trim_padding",
    "unstack_layer_params",
]
