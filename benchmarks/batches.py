"""Random batches of the input pipeline's shapes, with realistic text lengths.

Token ids and pixels are random, but each text row has the layout the CLIP
tokenizer produces: start-of-text, random word ids, end-of-text, then
end-of-text padding to 77 columns with attention mask 0, as
openai/clip-vit-base-patch32 pads. Row lengths (special tokens included) are
drawn per modality:

- text: the token lengths of the MVSA-Single tweets when that folder is
  given, else a log-normal fit to them (median 25 tokens, 90th percentile
  about 42, clipped to 77);
- attributes and pseudo attributes: uniform between 12 and 24 tokens, the
  length of strings such as "category: dress; color: red; pattern: floral;
  style: casual" (21 tokens).

`trim_text_padding` cuts the three text modalities to one shared length bucket,
because FashionMSA encodes them in one call on the stacked rows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from fashion_msa.clip.config import CLIPConfig
from fashion_msa.clip.tokenizer import trim_padding
from fashion_msa.model.msa import IMAGE_MODALITIES, TEXT_MODALITIES

# Log-normal fit to the MVSA-Single tweet lengths in CLIP tokens (median 25,
# 90th percentile 42), measured with fashion_msa.clip.tokenizer.
FIXED_TEXT_MEDIAN = 25.0
FIXED_TEXT_SIGMA = 0.41
ATTRIBUTE_LENGTH_RANGE = (12, 24)
PSEUDO_FRACTION = 0.85


def mvsa_text_lengths(mvsa_dir: str | os.PathLike) -> np.ndarray:
    """Tokenize every MVSA-Single post text; return int (posts,) token counts."""
    from fashion_msa.clip.tokenizer import load_tokenizer
    from fashion_msa.data import importers

    result = importers.load_posts("mvsa_single", mvsa_dir)
    if not result.posts:
        raise ValueError(f"no MVSA-Single posts found in {mvsa_dir}")
    tokenizer = load_tokenizer()
    encoded = tokenizer([post.text for post in result.posts])
    return encoded["attention_mask"].sum(axis=1).astype(np.int64)


class LengthSampler:
    """Draws the token length (special tokens included) of each text-like row.

    Attributes:
      text_lengths: lengths to resample text rows from, or None for the
        log-normal fit.
      max_length: row width, 77 for CLIP.
    """

    def __init__(self, text_lengths: np.ndarray | None = None, max_length: int = 77):
        self.text_lengths = text_lengths
        self.max_length = max_length

    @property
    def source(self) -> str:
        return "fixed" if self.text_lengths is None else "mvsa"

    def sample(
        self, rng: np.random.Generator, modality: str, batch_size: int
    ) -> np.ndarray:
        """Return int (batch_size,) lengths in [2, max_length] for `modality`."""
        if modality == "text":
            if self.text_lengths is not None:
                lengths = rng.choice(self.text_lengths, size=batch_size)
            else:
                lengths = np.rint(
                    FIXED_TEXT_MEDIAN
                    * np.exp(FIXED_TEXT_SIGMA * rng.standard_normal(batch_size))
                )
        else:
            low, high = ATTRIBUTE_LENGTH_RANGE
            lengths = rng.integers(low, high + 1, size=batch_size)
        return np.clip(lengths, 2, self.max_length).astype(np.int64)


def random_text_rows(
    rng: np.random.Generator, lengths: np.ndarray, config: CLIPConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Return int32 (batch, 77) ids and mask for rows of the given token lengths."""
    text = config.text
    width = text.max_position_embeddings
    bos = text.bos_token_id if text.bos_token_id is not None else 0
    input_ids = np.full((len(lengths), width), text.eos_token_id, np.int32)
    # Word ids stay below both special ids, as real tokenizer output does.
    words = rng.integers(0, min(bos, text.eos_token_id), size=(len(lengths), width))
    positions = np.arange(width)[None]
    is_word = (positions > 0) & (positions < lengths[:, None] - 1)
    input_ids = np.where(is_word, words, input_ids).astype(np.int32)
    input_ids[:, 0] = bos
    attention_mask = (positions < lengths[:, None]).astype(np.int32)
    return input_ids, attention_mask


def random_batch(
    rng: np.random.Generator,
    config: CLIPConfig,
    batch_size: int,
    sampler: LengthSampler,
) -> dict[str, np.ndarray]:
    """Return a batch dict with the keys, dtypes and shapes of the training loader."""
    batch = {}
    for modality in TEXT_MODALITIES:
        lengths = sampler.sample(rng, modality, batch_size)
        ids, mask = random_text_rows(rng, lengths, config)
        batch[f"{modality}/input_ids"] = ids
        batch[f"{modality}/attention_mask"] = mask
    size = config.vision.image_size
    for modality in IMAGE_MODALITIES:
        batch[modality] = rng.standard_normal(
            (batch_size, size, size, 3), dtype=np.float32
        )
    batch["has_pseudo"] = rng.random(batch_size) < PSEUDO_FRACTION
    batch["label"] = rng.integers(0, 3, size=batch_size).astype(np.int32)
    batch["valid"] = np.ones(batch_size, bool)
    return batch


def trim_text_padding(
    batch: Mapping[str, np.ndarray], buckets: Sequence[int]
) -> dict[str, np.ndarray]:
    """Cut the padding of all text modalities to the smallest bucket that fits them all.

    The modalities share one length because the model stacks them into one
    text-tower call.
    """
    ids = np.concatenate([batch[f"{m}/input_ids"] for m in TEXT_MODALITIES])
    mask = np.concatenate([batch[f"{m}/attention_mask"] for m in TEXT_MODALITIES])
    ids, mask = trim_padding(ids, mask, buckets)
    trimmed = dict(batch)
    for m, rows_ids, rows_mask in zip(
        TEXT_MODALITIES,
        np.split(ids, len(TEXT_MODALITIES)),
        np.split(mask, len(TEXT_MODALITIES)),
        strict=True,
    ):
        trimmed[f"{m}/input_ids"] = rows_ids
        trimmed[f"{m}/attention_mask"] = rows_mask
    return trimmed


def text_length(batch: Mapping[str, np.ndarray]) -> int:
    """Return the column count of the batch's text rows."""
    return int(batch[f"{TEXT_MODALITIES[0]}/input_ids"].shape[1])
