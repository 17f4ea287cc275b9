"""CLIP text tokenizer with fixed-length numpy output, and the OpenAI BPE vocabulary.

`load_tokenizer` wraps transformers' `CLIPTokenizerFast`. A checkpoint directory
with `tokenizer.json` or `vocab.json` + `merges.txt` supplies the vocabulary.
Without one, the tokenizer is built from OpenAI's `bpe_simple_vocab_16e6.txt.gz`,
the file that ships inside the `open-clip-torch` wheel. `build_vocab_files` turns
that file into Hugging Face `vocab.json` + `merges.txt`, and the result is cached
per user.

`trim_padding` cuts the padding columns of a batch down to a fixed bucket length.
This is exact for CLIP's text tower: attention is causal, so the padding after
the end-of-text token cannot change any earlier position, and pooling reads
the end-of-text position, which trimming keeps.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import os
import pathlib
import tempfile
from collections.abc import Sequence

import numpy as np
import transformers
from absl import logging

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
OPEN_CLIP_DISTRIBUTION = "open-clip-torch"
OPEN_CLIP_INSTALL_COMMAND = "pip install --no-deps open-clip-torch==3.3.0"

# OpenAI's CLIP keeps the first 49152 - 256 - 2 merges of the file, so the
# vocabulary is 256 byte tokens, the same with "</w>", one token per merge and
# the two special tokens: 49408 ids.
NUM_MERGES = 48894
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2

# The first line of a Hugging Face merges.txt. The tokenizers library skips it.
MERGES_HEADER = "#version: 0.2"

DEFAULT_LENGTH_BUCKETS = (8, 16, 32, 77)


class CLIPTextTokenizer:
    """Tokenizes texts into fixed-length CLIP input ids and attention masks.

    Attributes:
      tokenizer: the wrapped transformers `CLIPTokenizerFast`.
      max_length: number of columns of every output, special tokens included.
      bos_token_id: id of the start-of-text token (49406 in OpenAI's vocabulary).
      eos_token_id: id of the end-of-text token (49407 in OpenAI's vocabulary).
      pad_token_id: id written into padding columns. OpenAI's vocabulary and
        openai/clip-vit-base-patch32 pad with the end-of-text id 49407.
    """

    def __init__(
        self, tokenizer: transformers.PreTrainedTokenizerBase, max_length: int = 77
    ):
        if max_length < 2:
            raise ValueError(
                f"max_length must be at least 2 to hold the start and end tokens, "
                f"got {max_length}"
            )
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no end-of-text or padding "
                f"token (eos_token={tokenizer.eos_token!r}, "
                f"pad_token={tokenizer.pad_token!r})"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bos_token_id: int = tokenizer.bos_token_id
        self.eos_token_id: int = tokenizer.eos_token_id
        self.pad_token_id: int = tokenizer.pad_token_id

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenize `texts`, padded on the right and truncated to `max_length`.

        A text longer than `max_length` keeps its first `max_length - 2` tokens
        between the start and end tokens, so end-of-text is always present.

        Returns:
          {"input_ids": int32 (num_texts, max_length),
           "attention_mask": int32 (num_texts, max_length)}
        """
        if isinstance(texts, str):
            raise TypeError(
                "texts must be a sequence of strings, got a single str; "
                "wrap it in a list"
            )
        texts = list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(
                    f"texts[{index}] must be a str, got {type(text).__name__}"
                )
        if not texts:
            empty = np.zeros((0, self.max_length), np.int32)
            return {"input_ids": empty, "attention_mask": empty.copy()}

        encoded = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            padding_side="right",
            return_attention_mask=True,
            return_tensors="np",
        )
        return {
            "input_ids": encoded["input_ids"].astype(np.int32),
            "attention_mask": encoded["attention_mask"].astype(np.int32),
        }


def load_tokenizer(
    path: str | os.PathLike | None = None, max_length: int = 77
) -> CLIPTextTokenizer:
    """Load the CLIP tokenizer of a checkpoint directory.

    Args:
      path: a directory with `tokenizer.json`, or with `vocab.json` and
        `merges.txt`. When it is None or the directory has none of these
        files, the tokenizer uses OpenAI's vocabulary (see `cached_vocab_dir`).
      max_length: number of tokens of every output row (77 for CLIP).

    Raises:
      FileNotFoundError: `path` is not a directory, it has only one of
        `vocab.json` and `merges.txt`, or the OpenAI vocabulary is needed and
        `open-clip-torch` is not installed.
    """
    tokenizer_dir = None
    if path is not None:
        tokenizer_dir = pathlib.Path(path)
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_dir}")
        has_json = (tokenizer_dir / "tokenizer.json").is_file()
        has_vocab = (tokenizer_dir / "vocab.json").is_file()
        has_merges = (tokenizer_dir / "merges.txt").is_file()
        if not has_json and has_vocab != has_merges:
            present, missing = ("vocab.json", "merges.txt")[:: 1 if has_vocab else -1]
            raise FileNotFoundError(
                f"{tokenizer_dir} has {present} but {missing} is missing. Add "
                f"{missing}, or remove {present} to use OpenAI's CLIP vocabulary."
            )
        if not (has_json or has_vocab):
            logging.info(
                "%s has no tokenizer files; using OpenAI's CLIP vocabulary",
                tokenizer_dir,
            )
            tokenizer_dir = None

    if tokenizer_dir is None:
        tokenizer_dir = cached_vocab_dir()
    tokenizer = transformers.CLIPTokenizerFast.from_pretrained(str(tokenizer_dir))
    logging.info("Loaded the CLIP tokenizer from %s", tokenizer_dir)
    return CLIPTextTokenizer(tokenizer, max_length=max_length)


def trim_padding(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut trailing padding columns down to the smallest bucket that fits every row.

    A fixed list of buckets bounds the number of distinct shapes, and so the
    number of compilations of a jitted text encoder. The attention mask counts
    the end-of-text token, so every row keeps it.

    Args:
      input_ids: int (batch, length), padded on the right.
      attention_mask: int (batch, length), 1 on tokens and 0 on padding.
      buckets: allowed lengths in increasing order. When the longest row is
        longer than every bucket, or the chosen bucket is not shorter than
        `length`, the batch comes back with its full length.

    Returns:
      (input_ids, attention_mask), both (batch, trimmed_length).
    """
    input_ids = np.asarray(input_ids)
    attention_mask = np.asarray(attention_mask)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be (batch, length), got "
            f"{input_ids.shape} and {attention_mask.shape}"
        )
    buckets = tuple(int(bucket) for bucket in buckets)
    if (
        not buckets
        or buckets[0] < 1
        or any(a >= b for a, b in zip(buckets, buckets[1:], strict=False))
    ):
        raise ValueError(
            f"buckets must be positive and strictly increasing, got {buckets}"
        )

    # Trimming from the right is only correct for right padding, where each
    # row is a run of ones followed by zeros.
    lengths = attention_mask.sum(axis=1)
    positions = np.arange(attention_mask.shape[1])
    if not np.array_equal(attention_mask != 0, positions < lengths[:, None]):
        raise ValueError(
            "attention_mask must be right-padded (ones, then zeros, in every row)"
        )

    full_length = input_ids.shape[1]
    longest = int(lengths.max(initial=0))
    trimmed_length = next(
        (bucket for bucket in buckets if bucket >= longest), full_length
    )
    trimmed_length = min(trimmed_length, full_length)
    return (
        np.ascontiguousarray(input_ids[:, :trimmed_length]),
        np.ascontiguousarray(attention_mask[:, :trimmed_length]),
    )


def find_bpe_file() -> pathlib.Path:
    """Return the path of OpenAI's BPE file inside the installed `open-clip-torch`.

    The package metadata locates the file, because `import open_clip` fails
    without torchvision.

    Raises:
      FileNotFoundError: `open-clip-torch` is not installed, or its wheel
        lacks the file.
    """
    hint = (
        f"OpenAI's CLIP vocabulary {BPE_FILE_NAME} was not found; it ships "
        f"inside the open-clip-torch wheel. Install it without its dependencies: "
        f"`{OPEN_CLIP_INSTALL_COMMAND}`"
    )
    try:
        files = importlib.metadata.files(OPEN_CLIP_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(hint) from error
    for file in files:
        if file.name == BPE_FILE_NAME:
            located = pathlib.Path(file.locate())
            if located.is_file():
                return located
    raise FileNotFoundError(hint)


def build_vocab_files(
    out_dir: str | os.PathLike, bpe_path: str | os.PathLike | None = None
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write Hugging Face `vocab.json` and `merges.txt` built from OpenAI's BPE file.

    The vocabulary lists the 256 byte characters, the same characters with the
    end-of-word suffix "</w>", one token per merge and then `<|startoftext|>`
    (49406) and `<|endoftext|>` (49407), the order OpenAI's CLIP uses.

    Args:
      out_dir: directory to write into; created when missing.
      bpe_path: a `bpe_simple_vocab_16e6.txt.gz`; by default the one inside
        the installed `open-clip-torch` (see `find_bpe_file`).

    Returns:
      (vocab_path, merges_path).
    """
    bpe_path = pathlib.Path(bpe_path) if bpe_path is not None else find_bpe_file()
    with gzip.open(bpe_path, "rt", encoding="utf-8") as bpe_file:
        # Line 0 is a version header, so the merges start on line 1.
        lines = bpe_file.read().split("\n")
    merges = lines[1 : 1 + NUM_MERGES]
    malformed = [merge for merge in merges if len(merge.split(" ")) != 2]
    if len(merges) != NUM_MERGES or malformed:
        raise ValueError(
            f"{bpe_path} is not OpenAI's CLIP BPE file: expected {NUM_MERGES} merges "
            f"of two symbols after the header line, got {len(merges)} lines, "
            f"{len(malformed)} malformed (first: {malformed[:1]})"
        )

    alphabet = _byte_alphabet()
    tokens = [
        *alphabet,
        *(symbol + "</w>" for symbol in alphabet),
        *(merge.replace(" ", "") for merge in merges),
        BOS_TOKEN,
        EOS_TOKEN,
    ]
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(
            f"{bpe_path} gives {len(vocab)} distinct tokens, expected {VOCAB_SIZE}"
        )

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path = out_dir / "vocab.json"
    merges_path = out_dir / "merges.txt"
    _write_text_atomically(vocab_path, json.dumps(vocab, ensure_ascii=False))
    _write_text_atomically(merges_path, "\n".join([MERGES_HEADER, *merges]) + "\n")
    return vocab_path, merges_path


def default_cache_dir() -> pathlib.Path:
    """Return the per-user cache directory, $XDG_CACHE_HOME/fashion_msa.

    XDG_CACHE_HOME defaults to ~/.cache.
    """
    cache_home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(cache_home) / "fashion_msa"


def cached_vocab_dir(bpe_path: str | os.PathLike | None = None) -> pathlib.Path:
    """Return a directory with `vocab.json` + `merges.txt` built from OpenAI's BPE file.

    The files are built once into `default_cache_dir()/clip_vocab/<sha256>`, keyed
    by the BPE file's SHA-256 so a different file never reuses stale output.
    """
    bpe_path = pathlib.Path(bpe_path) if bpe_path is not None else find_bpe_file()
    digest = hashlib.sha256(bpe_path.read_bytes()).hexdigest()
    vocab_dir = default_cache_dir() / "clip_vocab" / digest
    if not (
        (vocab_dir / "vocab.json").is_file() and (vocab_dir / "merges.txt").is_file()
    ):
        logging.info("Building CLIP vocab.json and merges.txt from %s", bpe_path)
        build_vocab_files(vocab_dir, bpe_path)
    return vocab_dir


def _byte_alphabet() -> list[str]:
    """Return the character that represents each byte, in OpenAI's vocabulary order.

    Printable Latin-1 bytes represent themselves and come first. The other 68
    bytes (controls, space, soft hyphen) map to the characters from U+0100 on,
    in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    printable_set = set(printable)
    others = [byte for byte in range(256) if byte not in printable_set]
    return [chr(byte) for byte in printable] + [
        chr(256 + index) for index in range(len(others))
    ]


def _write_text_atomically(path: pathlib.Path, text: str) -> None:
    """Write `text` to `path` through a renamed temporary file.

    A reader of the cache never opens a half-written file, even when several
    processes build it at the same time.
    """
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as temporary:
        try:
            temporary.write(text)
        except BaseException:
            os.unlink(temporary.name)
            raise
    os.chmod(temporary.name, 0o644)
    os.replace(temporary.name, path)
