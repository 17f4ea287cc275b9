"""Tests for fashion_msa.clip.tokenizer against transformers' CLIPTokenizerFast."""

import gzip
import hashlib
import importlib.metadata
import json
import pathlib

import numpy as np
import pytest
import transformers

from fashion_msa.clip import tokenizer as tokenizer_lib

BOS_ID = 49406
EOS_ID = 49407
MAX_LENGTH = 77


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    """Point the tokenizer cache at a temporary directory for this module."""
    path = tmp_path_factory.mktemp("cache_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> pathlib.Path:
    """A directory with vocab.json + merges.txt built from OpenAI's BPE file."""
    path = tmp_path_factory.mktemp("vocab")
    tokenizer_lib.build_vocab_files(path)
    return path


@pytest.fixture(scope="module")
def reference_dir(vocab_dir, tmp_path_factory) -> pathlib.Path:
    """A checkpoint-style directory with tokenizer.json, saved by transformers."""
    path = tmp_path_factory.mktemp("reference")
    transformers.CLIPTokenizerFast.from_pretrained(str(vocab_dir)).save_pretrained(
        str(path)
    )
    return path


@pytest.fixture(scope="module")
def reference_tokenizer(reference_dir):
    return transformers.CLIPTokenizerFast.from_pretrained(str(reference_dir))


def reference_encode(reference_tokenizer, texts, max_length=MAX_LENGTH):
    """Tokenize with CLIPTokenizerFast's own padding and truncation."""
    encoded = reference_tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="np",
    )
    return encoded["input_ids"], encoded["attention_mask"]


# The MVSA release replaced emoji with "?", so these made-up texts supply the
# emoji, along with other text the normaliser and byte-level BPE must handle.
EXTRA_TEXTS = [
    "love this dress 😍👗🔥",
    "family 👩\u200d👩\u200d👧 and flags 🇯🇵🇫🇷, skin tones 👍🏽👍🏿",
    "café vs cafe\u0301 (NFC against NFD)",
    "tabs\tand\r\nnew lines, non-breaking\u00a0space, zero\u200bwidth",
    "control \x01\x7f\x9d characters",
    "漂亮的裙子！ かわいい服 예쁜 옷 فستان جميل",
    "ＦＵＬＬＷＩＤＴＨ letters and 𝓯𝓪𝓷𝓬𝔂 ones",
    "RT @user: 50% off &amp; free shipping http://t.co/AbC123 #sale",
    "x" * 500,
    "   ",
    "don't won't it's I'll we're they've I'd I'm",
]


def read_mvsa_texts(mvsa_dir: pathlib.Path) -> tuple[list[str], dict[str, int]]:
    """Read every MVSA tweet text, returning the texts and per-encoding counts.

    Most files are UTF-8. All the others decode as GB18030, and all but 8 of
    them (Japanese text) also decode as cp1252. A file that decodes both ways
    gives both texts, so the comparison covers either choice of decoder.
    """
    texts, counts = [], {"utf-8": 0, "gb18030": 0, "cp1252": 0}
    for path in sorted(mvsa_dir.glob("data/*.txt")):
        data = path.read_bytes()
        try:
            texts.append(data.decode("utf-8"))
            counts["utf-8"] += 1
            continue
        except UnicodeDecodeError:
            pass
        texts.append(data.decode("gb18030"))
        counts["gb18030"] += 1
        try:
            texts.append(data.decode("cp1252"))
            counts["cp1252"] += 1
        except UnicodeDecodeError:
            pass
    return texts, counts


# Vocabulary files.


def test_vocab_files_known_entries(vocab_dir):
    vocab = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (vocab_dir / "merges.txt").read_text(encoding="utf-8").splitlines()

    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["!"] == 0
    assert vocab["a</w>"] == 320
    assert vocab["<|startoftext|>"] == BOS_ID
    assert vocab["<|endoftext|>"] == EOS_ID
    assert merges[0] == "#version: 0.2"
    assert len(merges) == 1 + 48894
    assert merges[1] == "i n"


def test_vocab_files_from_bad_bpe_file(tmp_path):
    bpe_path = tmp_path / "short.txt.gz"
    with gzip.open(bpe_path, "wt", encoding="utf-8") as bpe_file:
        bpe_file.write("header\ni n\nt h\n")
    with pytest.raises(ValueError, match="not OpenAI's CLIP BPE file"):
        tokenizer_lib.build_vocab_files(tmp_path / "out", bpe_path)


def test_missing_open_clip_names_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(FileNotFoundError) as raised:
        tokenizer_lib.find_bpe_file()
    assert "pip install --no-deps open-clip-torch==3.3.0" in str(raised.value)


def test_cached_vocab_keyed_by_sha256(cache_home, vocab_dir):
    bpe_path = tokenizer_lib.find_bpe_file()
    digest = hashlib.sha256(bpe_path.read_bytes()).hexdigest()

    cached = tokenizer_lib.cached_vocab_dir()

    assert cached == cache_home / "fashion_msa" / "clip_vocab" / digest
    for name in ("vocab.json", "merges.txt"):
        assert (cached / name).read_bytes() == (vocab_dir / name).read_bytes()


# Known ids and the wrapper's padding and truncation.


def test_known_ids_photo_of_a_cat(cache_home, reference_tokenizer):
    expected = [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]

    encoded = tokenizer_lib.load_tokenizer()(["a photo of a cat"])

    assert reference_tokenizer("a photo of a cat")["input_ids"] == expected
    assert encoded["input_ids"].dtype == np.int32
    assert encoded["attention_mask"].dtype == np.int32
    assert encoded["input_ids"].shape == (1, MAX_LENGTH)
    assert encoded["input_ids"][0, :7].tolist() == expected
    assert (encoded["input_ids"][0, 7:] == EOS_ID).all()
    assert encoded["attention_mask"][0].tolist() == [1] * 7 + [0] * (MAX_LENGTH - 7)


def test_special_token_ids(cache_home):
    tokenizer = tokenizer_lib.load_tokenizer()

    assert tokenizer.max_length == MAX_LENGTH
    assert tokenizer.bos_token_id == BOS_ID
    assert tokenizer.eos_token_id == EOS_ID
    assert tokenizer.pad_token_id == EOS_ID


@pytest.mark.parametrize("max_length", [77, 16])
def test_truncation_keeps_eos_last(cache_home, max_length):
    tokenizer = tokenizer_lib.load_tokenizer(max_length=max_length)
    text = "floral summer dress with a matching straw hat " * 30
    untruncated = tokenizer.tokenizer(text)["input_ids"]

    encoded = tokenizer([text, "short"])

    ids = encoded["input_ids"]
    assert len(untruncated) > max_length
    assert ids.shape == (2, max_length)
    assert ids[0, 0] == BOS_ID
    assert ids[0, -1] == EOS_ID
    assert ids[0, 1:-1].tolist() == untruncated[1 : max_length - 1]
    assert encoded["attention_mask"][0].all()
    assert ids[1, -1] == EOS_ID


def test_empty_batch_and_empty_text(cache_home):
    tokenizer = tokenizer_lib.load_tokenizer()

    empty_batch = tokenizer([])
    empty_text = tokenizer([""])

    assert empty_batch["input_ids"].shape == (0, MAX_LENGTH)
    assert empty_batch["attention_mask"].shape == (0, MAX_LENGTH)
    assert empty_text["input_ids"][0, :2].tolist() == [BOS_ID, EOS_ID]
    assert empty_text["attention_mask"][0].sum() == 2


def test_rejects_non_sequence_input(cache_home):
    tokenizer = tokenizer_lib.load_tokenizer()

    with pytest.raises(TypeError, match="single str"):
        tokenizer("a photo of a cat")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        tokenizer(["a photo", None])


# Loading from checkpoint directories.


def test_directory_without_tokenizer_files(cache_home, tmp_path, reference_tokenizer):
    texts = ["Loving this denim jacket!", "worst delivery ever :("]
    expected_ids, expected_mask = reference_encode(reference_tokenizer, texts)

    encoded = tokenizer_lib.load_tokenizer(tmp_path)(texts)

    np.testing.assert_array_equal(encoded["input_ids"], expected_ids)
    np.testing.assert_array_equal(encoded["attention_mask"], expected_mask)


def test_directory_missing_merges(tmp_path, vocab_dir):
    (tmp_path / "vocab.json").write_bytes((vocab_dir / "vocab.json").read_bytes())

    with pytest.raises(FileNotFoundError, match="merges.txt is missing"):
        tokenizer_lib.load_tokenizer(tmp_path)


def test_path_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        tokenizer_lib.load_tokenizer(tmp_path / "absent")


def test_mvsa_texts_equal_clip_tokenizer_fast(
    mvsa_dir, cache_home, vocab_dir, reference_dir, reference_tokenizer
):
    mvsa_texts, encodings = read_mvsa_texts(mvsa_dir)
    texts = mvsa_texts + EXTRA_TEXTS
    expected_ids, expected_mask = reference_encode(reference_tokenizer, texts)
    lengths = [len(ids) for ids in reference_tokenizer(texts)["input_ids"]]
    tokenizers = {
        "tokenizer.json": tokenizer_lib.load_tokenizer(reference_dir),
        "vocab.json + merges.txt": tokenizer_lib.load_tokenizer(vocab_dir),
        "OpenAI BPE, cached": tokenizer_lib.load_tokenizer(None),
    }

    # The comparison must cover the hard cases it claims to cover.
    assert encodings["utf-8"] + encodings["gb18030"] == 3966
    assert encodings["gb18030"] > 0
    assert encodings["cp1252"] > 0
    assert max(lengths) > MAX_LENGTH

    for source, tokenizer in tokenizers.items():
        encoded = tokenizer(texts)
        np.testing.assert_array_equal(
            encoded["input_ids"], expected_ids, err_msg=f"input_ids from {source}"
        )
        np.testing.assert_array_equal(
            encoded["attention_mask"],
            expected_mask,
            err_msg=f"attention_mask from {source}",
        )
    truncated = np.asarray(lengths) > MAX_LENGTH
    assert (expected_ids[truncated, -1] == EOS_ID).all()


# Trimming padding to buckets.


def encoded_lengths(lengths, max_length=MAX_LENGTH):
    """Build a right-padded batch whose rows end in EOS at the given lengths."""
    ids = np.full((len(lengths), max_length), EOS_ID, np.int32)
    mask = np.zeros((len(lengths), max_length), np.int32)
    for row, length in enumerate(lengths):
        ids[row, 0] = BOS_ID
        ids[row, 1 : length - 1] = 320
        mask[row, :length] = 1
    return ids, mask


@pytest.mark.parametrize(
    ("lengths", "max_length", "expected_length"),
    [
        ([2, 7], 77, 8),
        ([8], 77, 8),
        ([3, 9], 77, 16),
        ([17, 2], 77, 32),
        ([33], 77, 77),
        ([77, 5], 77, 77),
        ([40], 64, 64),
        ([], 77, 8),
    ],
)
def test_trim_padding_bucket_choice(lengths, max_length, expected_length):
    ids, mask = encoded_lengths(lengths, max_length)

    trimmed_ids, trimmed_mask = tokenizer_lib.trim_padding(ids, mask, (8, 16, 32, 77))

    assert trimmed_ids.shape == (len(lengths), expected_length)
    assert trimmed_mask.shape == (len(lengths), expected_length)
    np.testing.assert_array_equal(trimmed_ids, ids[:, :expected_length])
    np.testing.assert_array_equal(trimmed_mask, mask[:, :expected_length])


def test_trim_padding_keeps_every_eos(mvsa_dir, cache_home):
    texts, _ = read_mvsa_texts(mvsa_dir)
    encoded = tokenizer_lib.load_tokenizer()(texts)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    lengths = mask.sum(axis=1)

    for start in range(0, len(texts), 32):
        batch = slice(start, start + 32)
        trimmed_ids, trimmed_mask = tokenizer_lib.trim_padding(ids[batch], mask[batch])

        assert trimmed_ids.shape[1] in tokenizer_lib.DEFAULT_LENGTH_BUCKETS
        assert trimmed_ids.shape[1] >= lengths[batch].max()
        rows = np.arange(trimmed_ids.shape[0])
        assert (trimmed_ids[rows, lengths[batch] - 1] == EOS_ID).all()
        np.testing.assert_array_equal(trimmed_mask.sum(axis=1), lengths[batch])


def test_trim_padding_rejects_left_padding():
    ids, mask = encoded_lengths([3, 5])
    left_padded = mask[:, ::-1]

    with pytest.raises(ValueError, match="right-padded"):
        tokenizer_lib.trim_padding(ids, left_padded)


@pytest.mark.parametrize("buckets", [(), (16, 8), (0, 8), (8, 8)])
def test_trim_padding_rejects_bad_buckets(buckets):
    ids, mask = encoded_lengths([3])

    with pytest.raises(ValueError, match="strictly increasing"):
        tokenizer_lib.trim_padding(ids, mask, buckets)
