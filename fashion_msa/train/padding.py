"""Host-side trimming of the text padding of a batch to a few fixed lengths.

CLIP's text tower is causal and pools the end-of-text position, so the padding
after the last token of every row changes no output. Cutting it saves
text-tower work, and a short fixed list of lengths bounds the number of
shapes, and so of compilations, of a jitted step. The three text modalities
share one length because the model encodes them in one stacked call.
"""

from collections.abc import Mapping, Sequence

import numpy as np

from fashion_msa.clip.tokenizer import trim_padding
from fashion_msa.model.msa import TEXT_MODALITIES


def trim_batch_text(
    batch: Mapping[str, np.ndarray], buckets: Sequence[int]
) -> dict[str, np.ndarray]:
    """Cut every text modality of `batch` to the smallest bucket that fits them all.

    Args:
      batch: a batch dict of the input pipeline, text rows right-padded.
      buckets: allowed lengths in increasing order, e.g. (16, 32, 48, 64, 77).

    Returns:
      A new dict; "{m}/input_ids" and "{m}/attention_mask" are (batch, length)
      with one shared length, other entries are the same arrays.
    """
    input_ids = np.concatenate([batch[f"{m}/input_ids"] for m in TEXT_MODALITIES])
    attention_mask = np.concatenate(
        [batch[f"{m}/attention_mask"] for m in TEXT_MODALITIES]
    )
    input_ids, attention_mask = trim_padding(input_ids, attention_mask, buckets)
    trimmed = dict(batch)
    parts = len(TEXT_MODALITIES)
    for m, ids, mask in zip(
        TEXT_MODALITIES,
        np.split(input_ids, parts),
        np.split(attention_mask, parts),
        strict=True,
    ):
        trimmed[f"{m}/input_ids"] = ids
        trimmed[f"{m}/attention_mask"] = mask
    return trimmed
