"""Tests for the post importers and the restricted unpickler."""

import collections
import csv
import io
import json
import os
import pathlib
import pickle
import re

import pytest
from PIL import Image

from fashion_msa.data import importers, safe_pickle, synthetic
from fashion_msa.data.mvsa_single import decode_text, merge_labels
from fashion_msa.data.posts import (
    PathOutsideInputError,
    SkipReason,
    format_attributes,
    parse_label,
    resolve_inside,
)


def png_bytes(colour=(200, 30, 40), size=(16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_manifest_dir(root: pathlib.Path, records: list[dict]) -> pathlib.Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for record in records:
        image = root / record.get("image", "")
        if record.get("image") and not image.exists() and "missing" not in str(image):
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(png_bytes())
    (root / "manifest.jsonl").write_text(
        "".join(json.dumps(record) + "\n" for record in records)
    )
    return root


def good_record(post_id: str, **overrides) -> dict:
    record = {
        "id": post_id,
        "text": f"text of {post_id}",
        "image": f"images/{post_id}.png",
        "attributes": {"category": "dress", "color": "red"},
        "label": "positive",
        "split": "train",
    }
    record.update(overrides)
    return record


# Manifest.


def test_manifest_jsonl_fields(tmp_path):
    root = write_manifest_dir(
        tmp_path,
        [
            good_record("a"),
            good_record("b", label="Negative", split="val", attributes="fit: loose"),
            good_record("c", label=1, split="test", attributes=None, shop="x"),
        ],
    )
    result = importers.load_posts("manifest", root)

    assert [post.id for post in result.posts] == ["a", "b", "c"]
    assert result.skipped == []
    a, b, c = result.posts
    assert a.attributes == "category: dress; color: red"
    assert a.image_path == (root / "images/a.png").resolve()
    assert (b.label, b.split, b.attributes) == ("negative", "val", "fit: loose")
    assert (c.label, c.split, c.attributes) == ("neutral", "test", "")
    assert c.metadata == {"shop": "x"}
    assert result.counts == {"records": 3, "posts": 3, "skipped": 0}


def test_manifest_csv(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "p1.png").write_bytes(png_bytes())
    with (tmp_path / "posts.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "image", "attributes", "label", "split", "user"])
        writer.writerow(
            ["p1", "So, nice", "imgs/p1.png", "color: red", "2", "train", "u7"]
        )
        writer.writerow(["p2", "x", "imgs/p2.png", "", "positive", "train", "u8"])

    result = importers.load_posts("manifest", tmp_path / "posts.csv")

    assert [post.id for post in result.posts] == ["p1"]
    post = result.posts[0]
    assert (post.text, post.attributes, post.label) == (
        "So, nice",
        "color: red",
        "positive",
    )
    assert post.metadata == {"user": "u7"}
    assert [str(skip) for skip in result.skipped] == [
        "p2: missing_image (imgs/p2.png not found)"
    ]


def test_manifest_bad_records_are_skipped_with_reasons(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes())
    root = tmp_path / "input"
    root.mkdir()
    (root / "images").mkdir()
    os.symlink(outside, root / "images" / "link.png")
    records = [
        good_record("ok"),
        good_record("bad_label", label="happy"),
        good_record("int_label", label=7),
        good_record("bad_split", split="dev"),
        good_record("dotdot", image="../outside.png"),
        good_record("absolute", image=str(outside)),
        good_record("symlink", image="images/link.png"),
        good_record("missing", image="images/missing.png"),
        good_record("a/b"),
        {
            "id": "no_text",
            "image": "images/ok.png",
            "label": "neutral",
            "split": "train",
        },
    ]
    write_manifest_dir(root, records)
    with (root / "manifest.jsonl").open("a") as f:
        f.write("{not json\n")
        f.write("[1, 2]\n")

    result = importers.load_posts("manifest", root)

    assert [post.id for post in result.posts] == ["ok"]
    reasons = {skip.id: skip.reason for skip in result.skipped}
    assert reasons == {
        "bad_label": SkipReason.UNKNOWN_LABEL,
        "int_label": SkipReason.UNKNOWN_LABEL,
        "bad_split": SkipReason.UNKNOWN_SPLIT,
        "dotdot": SkipReason.PATH_OUTSIDE_INPUT,
        "absolute": SkipReason.PATH_OUTSIDE_INPUT,
        "symlink": SkipReason.PATH_OUTSIDE_INPUT,
        "missing": SkipReason.MISSING_IMAGE,
        "line 9": SkipReason.INVALID_ID,
        "no_text": SkipReason.MISSING_FIELD,
        "line 11": SkipReason.MALFORMED_RECORD,
        "line 12": SkipReason.MALFORMED_RECORD,
    }
    assert result.counts == {"records": 12, "posts": 1, "skipped": 11}


def test_manifest_duplicate_id_raises(tmp_path):
    root = write_manifest_dir(
        tmp_path, [good_record("a"), good_record("b"), good_record("a", label="happy")]
    )
    with pytest.raises(importers.DuplicateIdError, match="'a'"):
        importers.load_posts("manifest", root)


def test_unknown_source_raises(tmp_path):
    with pytest.raises(ValueError, match="unknown source 'instagram'"):
        importers.load_posts("instagram", tmp_path)


# Shared helpers.


def test_resolve_inside_allows_inner_symlink(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    assert resolve_inside(tmp_path, "b.png") == (tmp_path / "a.png").resolve()
    with pytest.raises(PathOutsideInputError, match="outside"):
        resolve_inside(tmp_path / "sub", "../a.png")


@pytest.mark.parametrize(
    "raw, expected",
    [
        (None, ""),
        (" fit: loose ", "fit: loose"),
        ({"color": "red", "size": ["S", "M"]}, "color: red; size: S, M"),
        (["color: red", ("style", "casual")], "color: red; style: casual"),
    ],
)
def test_format_attributes(raw, expected):
    assert format_attributes(raw) == expected


def test_parse_label_needs_names_for_integers():
    assert parse_label(" POSITIVE ") == "positive"
    assert parse_label(0, label_names=("positive", "neutral", "negative")) == "positive"
    with pytest.raises(ValueError, match="needs label_names"):
        parse_label(2)


# FashionSenti.


def write_fashion_senti(root: pathlib.Path) -> pathlib.Path:
    (root / "images").mkdir(parents=True)
    for post_id in ("101", "102", "201", "301", "302"):
        (root / "images" / f"{post_id}.jpg").write_bytes(png_bytes())
    (root / "custom").mkdir()
    (root / "custom" / "x.png").write_bytes(png_bytes())
    train = {
        101: {"text": "love it", "label": "positive", "user": "u1", "likes": 3},
        102: {"text": "meh", "label": "Neutral", "attributes": {"color": "blue"}},
        103: {"text": "no image", "label": "negative"},
        104: {"text": "bad label", "label": "great"},
    }
    val = [{"id": "201", "text": "ugly", "label": "negative", "image": "custom/x.png"}]
    test = {
        "301": {"text": "ok", "label": "neutral"},
        "302": {"text": "x", "label": "neutral"},
    }
    for split, data in (("train", train), ("val", val), ("test", test)):
        with (root / f"final_dict_{split}.pkl").open("wb") as f:
            pickle.dump(data, f, protocol=2)
    with (root / "attribute_dict.pkl").open("wb") as f:
        pickle.dump(
            {101: {"category": "dress", "color": ["red", "white"]}, 302: "a: b"}, f
        )
    with (root / "attribute_dict_test.pkl").open("wb") as f:
        pickle.dump({"302": "a: c", "999": "color: red"}, f)
    return root


def test_fashion_senti_layout(tmp_path):
    result = importers.load_posts("fashion_senti", write_fashion_senti(tmp_path))

    posts = {post.id: post for post in result.posts}
    assert sorted(posts) == ["101", "102", "201", "301"]
    assert posts["101"].attributes == "category: dress; color: red, white"
    assert posts["101"].metadata == {"user": "u1", "likes": "3"}
    assert posts["102"].label == "neutral"
    assert posts["102"].attributes == "color: blue"
    assert posts["201"].split == "val"
    assert posts["201"].image_path.name == "x.png"
    assert posts["301"].split == "test"
    assert posts["301"].attributes == ""
    assert {skip.id: skip.reason for skip in result.skipped} == {
        "103": SkipReason.MISSING_IMAGE,
        "104": SkipReason.UNKNOWN_LABEL,
        "302": SkipReason.CONFLICTING_ATTRIBUTES,
    }
    assert result.counts["attribute_entries_without_post"] == 1
    assert result.counts["posts_train"] == 2


def test_fashion_senti_integer_labels(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(png_bytes())
    with (tmp_path / "final_dict_train.pkl").open("wb") as f:
        pickle.dump({1: {"text": "t", "label": 2}}, f)

    skipped = importers.load_posts("fashion_senti", tmp_path).skipped
    assert [skip.reason for skip in skipped] == [SkipReason.UNKNOWN_LABEL]
    names = ("positive", "negative", "neutral")
    result = importers.load_posts("fashion_senti", tmp_path, label_names=names)
    assert [post.label for post in result.posts] == ["neutral"]


def test_fashion_senti_duplicate_across_splits(tmp_path):
    (tmp_path / "images").mkdir()
    for split in ("train", "val"):
        with (tmp_path / f"final_dict_{split}.pkl").open("wb") as f:
            pickle.dump({"7": {"text": "t", "label": "neutral"}}, f)
    with pytest.raises(importers.DuplicateIdError, match="'7'"):
        importers.load_posts("fashion_senti", tmp_path)


class _RunsShellCommand:
    """Unpickling this object would call os.system with the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_rejected_before_running(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "images").mkdir()
    payload = {
        "1": {
            "text": "t",
            "label": "neutral",
            "x": _RunsShellCommand(f"touch {marker}"),
        }
    }
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        with (tmp_path / "final_dict_train.pkl").open("wb") as f:
            pickle.dump(payload, f, protocol=protocol)

        with pytest.raises(
            safe_pickle.UnsafePickleError, match=r"rejected class posix\.system"
        ):
            importers.load_posts("fashion_senti", tmp_path)
        assert not marker.exists()


def test_restricted_unpickler_rejects_classes_and_keeps_plain_data(tmp_path):
    plain = {
        "list": [1, 2.5, None, True, "é"],
        "tuple": (b"\x00\xff", -3),
        "set": {1, 2},
        "frozenset": frozenset({"a"}),
        "ordered": collections.OrderedDict(a=1),
        "complex": 1 + 2j,
        "bytearray": bytearray(b"xy"),
    }
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert (
            safe_pickle.loads_untrusted(pickle.dumps(plain, protocol=protocol)) == plain
        )

    with pytest.raises(safe_pickle.UnsafePickleError, match=r"pathlib\.PosixPath"):
        safe_pickle.loads_untrusted(pickle.dumps(pathlib.Path("/tmp")))
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"builtins\.eval"):
        safe_pickle.loads_untrusted(b"cbuiltins\neval\n(S'1+1'\ntR.")


# MVSA-Single.


@pytest.mark.parametrize(
    "text_label, image_label, merged",
    [
        ("positive", "positive", "positive"),
        ("neutral", "negative", "negative"),
        ("positive", "neutral", "positive"),
        ("neutral", "neutral", "neutral"),
        ("positive", "negative", None),
        ("negative", "positive", None),
    ],
)
def test_merge_labels(text_label, image_label, merged):
    assert merge_labels(text_label, image_label) == merged


def test_decode_text_fallbacks():
    assert decode_text("café\r\n".encode()) == ("café", "utf-8")
    # GB18030 bytes as they occur in MVSA-Single: quotation marks and Japanese.
    assert decode_text(b"\xa1\xb0hi\xa1\xb1") == ("“hi”", "gb18030")
    assert decode_text("だいぶ眠い".encode("gb18030")) == ("だいぶ眠い", "gb18030")
    assert decode_text(b"caf\xe9 \x93hi\x94") == ("café “hi”", "cp1252")
    # 0x81 is undefined in Python's cp1252; browsers map it to U+0081.
    assert decode_text(b"\x81") == ("\x81", "cp1252")


def write_mvsa(root: pathlib.Path, with_test_split: bool) -> pathlib.Path:
    (root / "data").mkdir(parents=True)
    labels = {
        "1": "positive,positive",
        "2": "neutral,negative",
        "3": "positive,negative",
        "4": "negative,positive",
        "5": "neutral,neutral",
        "6": "neutral,happy",
        "7": "positive,neutral",
        "8": "negative,negative",
    }
    (root / "labelResultAll.txt").write_text(
        "ID\ttext,image\n" + "".join(f"{i}\t{v}\n" for i, v in labels.items())
    )
    for post_id in labels:
        (root / "data" / f"{post_id}.jpg").write_bytes(png_bytes())
        (root / "data" / f"{post_id}.txt").write_bytes(f"tweet {post_id}\r\n".encode())
    (root / "data" / "2.txt").write_bytes(b"na\xefve \x93quote\x94\r\n")
    (root / "data" / "7.jpg").unlink()
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("1\n2\n3\n6\n7\n")
    (root / "splits" / "val.txt").write_text("5\n9\n")
    if with_test_split:
        (root / "splits" / "test.txt").write_text("8\n")
    return root


@pytest.mark.parametrize("with_test_split", [False, True])
def test_mvsa_layout(tmp_path, with_test_split):
    result = importers.load_posts("mvsa_single", write_mvsa(tmp_path, with_test_split))

    posts = {post.id: post for post in result.posts}
    expected = {"1": "train", "2": "train", "5": "val"}
    if with_test_split:
        expected["8"] = "test"
    assert {post_id: post.split for post_id, post in posts.items()} == expected
    assert posts["2"].label == "negative"
    assert posts["2"].text == "naïve “quote”"
    assert posts["2"].metadata == {"text_label": "neutral", "image_label": "negative"}
    assert posts["1"].attributes == ""
    assert sorted(skip.id for skip in result.dropped) == ["3", "4"]
    skipped = {skip.id: skip.reason for skip in result.skipped}
    assert skipped == {
        "6": SkipReason.UNKNOWN_LABEL,
        "7": SkipReason.MISSING_IMAGE,
        "9": SkipReason.MISSING_LABEL,
        **({} if with_test_split else {"8": SkipReason.NO_SPLIT}),
    }
    assert result.counts["conflicts"] == 2
    assert result.counts["cp1252_texts"] == 1


def test_mvsa_without_split_files(tmp_path):
    root = write_mvsa(tmp_path, with_test_split=False)
    for path in (root / "splits").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match="default_split='train'"):
        importers.load_posts("mvsa_single", root)
    result = importers.load_posts("mvsa_single", root, default_split="train")
    assert {post.split for post in result.posts} == {"train"}


def test_mvsa_shared_copy_counts(mvsa_dir):
    result = importers.load_posts("mvsa_single", mvsa_dir)

    assert result.counts["posts_train"] == 2706
    assert result.counts["posts_val"] == 902
    assert result.counts["posts_test"] == 0
    assert result.counts["conflicts"] == 358
    assert result.skipped == []
    # Every non-UTF-8 tweet of the shared copy is GB18030; none needs cp1252.
    assert result.counts["utf8_texts"] == 2758
    assert result.counts["gb18030_texts"] == 850
    assert result.counts["cp1252_texts"] == 0


# Synthetic.


def test_synthetic_is_deterministic(tmp_path):
    first = importers.load_posts(
        "synthetic", tmp_path / "a", num_posts=30, image_size=16
    )
    second = importers.load_posts(
        "synthetic", tmp_path / "b", num_posts=30, image_size=16
    )
    other_seed = importers.load_posts(
        "synthetic", tmp_path / "c", num_posts=30, image_size=16, seed=1
    )

    assert [post.text for post in first.posts] == [post.text for post in second.posts]
    for name in ("manifest.jsonl", "pseudo/descriptions.jsonl", "images/syn00007.png"):
        assert (tmp_path / "a" / name).read_bytes() == (
            tmp_path / "b" / name
        ).read_bytes()
    assert [post.text for post in first.posts] != [
        post.text for post in other_seed.posts
    ]
    with Image.open(tmp_path / "a/images/syn00000.png") as image:
        assert image.size == (16, 16)


def test_synthetic_reuses_matching_folder_and_rejects_others(tmp_path):
    importers.load_posts("synthetic", tmp_path / "s", num_posts=12, image_size=16)
    again = importers.load_posts(
        "synthetic", tmp_path / "s", num_posts=12, image_size=16
    )
    assert len(again.posts) == 12
    with pytest.raises(FileExistsError, match="drawn with"):
        importers.load_posts("synthetic", tmp_path / "s", num_posts=13, image_size=16)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        importers.load_posts("synthetic", tmp_path / "other")


def _template_label(text: str) -> str:
    """Return the label whose template produced `text`."""
    for label, templates in synthetic.TEXT_TEMPLATES.items():
        for template in templates:
            pattern = re.escape(template)
            for field in ("colour", "category", "pattern"):
                pattern = pattern.replace(re.escape("{" + field + "}"), r"[\w-]+")
            if re.fullmatch(pattern, text):
                return label
    raise AssertionError(f"no template produced {text!r}")


def test_synthetic_text_alone_is_not_enough(tmp_path):
    result = importers.load_posts("synthetic", tmp_path, num_posts=600, image_size=16)
    posts = result.posts
    assert {post.split for post in posts} == {"train", "val", "test"}

    # Reading the sentiment of the text template is the best text-only rule.
    text_sentiment = [_template_label(post.text) for post in posts]
    text_only = sum(
        sentiment == post.label
        for sentiment, post in zip(text_sentiment, posts, strict=True)
    ) / len(posts)
    assert 0.6 < text_only < 0.75, text_only
    neutral_looking = collections.Counter(
        post.label
        for sentiment, post in zip(text_sentiment, posts, strict=True)
        if sentiment == "neutral"
    )
    assert min(neutral_looking.values()) > 60, neutral_looking

    # Image and attribute cues carry the label of posts whose text looks neutral.
    cues = collections.Counter(post.metadata["cue"] for post in posts)
    assert cues["image"] > 100
    assert cues["attributes"] > 60
    for post in posts:
        if post.metadata["cue"] == "attributes":
            assert f"fit: {synthetic.FIT_BY_LABEL[post.label]}" in post.attributes
        else:
            assert "fit: regular" in post.attributes
    pseudo_kinds = collections.Counter(post.metadata["pseudo"] for post in posts)
    assert set(pseudo_kinds) == {"consistent", "inconsistent", "failed", "no_image"}
