"""Tests for the TFDS builder, the build report and the build_dataset CLI."""

import importlib.metadata
import io
import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image
from test_data_importers import (
    good_record,
    png_bytes,
    write_fashion_senti,
    write_manifest_dir,
    write_mvsa,
)

from fashion_msa.data import builder
from fashion_msa.data.importers import DuplicateIdError, load_posts
from fashion_msa.data.report import read_report

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def png_header_only(width: int, height: int) -> bytes:
    """Return a PNG whose header declares width x height pixels but has no pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def records_by_id(source) -> dict[str, dict]:
    return {record["id"].decode(): record for record in source}


def write_bad_input(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A manifest with one post of each kind of bad input, and a pseudo folder."""
    outside = root / "outside.png"
    root.mkdir(parents=True)
    outside.write_bytes(png_bytes())
    input_dir = root / "input"
    images = input_dir / "images"
    images.mkdir(parents=True)
    files = {
        "zero.png": b"",
        "garbage.png": b"this is not an image",
        "truncated.jpg": truncated_jpeg(),
        "bomb.png": png_header_only(20_000, 20_000),
        "big.png": png_bytes(size=(1200, 1000)),
    }
    for name, data in files.items():
        (images / name).write_bytes(data)
    os.symlink(outside, images / "link.png")
    records = [
        good_record("ok1"),
        good_record("ok2", split="val", label="negative"),
        good_record("ok3", split="test", label="neutral", attributes=""),
        good_record("zero", image="images/zero.png"),
        good_record("garbage", image="images/garbage.png"),
        good_record("truncated", image="images/truncated.jpg"),
        good_record("bomb", image="images/bomb.png"),
        good_record("big", image="images/big.png"),
        good_record("missing", image="images/missing.png"),
        good_record("happy", label="happy"),
        good_record("escape", image="../outside.png"),
        good_record("symlink", image="images/link.png"),
    ]
    write_manifest_dir(input_dir, records)

    pseudo_dir = root / "pseudo"
    (pseudo_dir / "images").mkdir(parents=True)
    lines = [
        {"id": "ok1", "status": "ok", "image_description": "old", "attributes": {}},
        {
            "id": "ok1",
            "status": "ok",
            "image_description": "a red dress",
            "attributes": {"category": "dress", "mood": "cheerful"},
        },
        {"id": "ok1", "status": "failed", "reason": "timeout"},
        {
            "id": "ok2",
            "status": "ok",
            "image_description": "x",
            "attributes": {"a": "b"},
        },
        {"id": "ok3", "status": "failed", "reason": "bad json"},
        {"id": "ghost", "status": "ok", "image_description": "y", "attributes": {}},
    ]
    (pseudo_dir / "descriptions.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines) + "{broken\n"
    )
    (pseudo_dir / "images" / "ok1.png").write_bytes(png_bytes(colour=(0, 0, 255)))
    (pseudo_dir / "images" / "ok2.png").write_bytes(b"\x89PNG\r\n\x1a\ncut")
    (pseudo_dir / "images" / "ghost.png").write_bytes(png_bytes())
    return input_dir, pseudo_dir


EXPECTED_SKIP_LINES = [
    "zero: empty_image (zero.png has zero bytes)",
    "garbage: unreadable_image (garbage.png: ",
    "truncated: unreadable_image (truncated.jpg: ",
    # Pillow itself rejects images over 2 * Image.MAX_IMAGE_PIXELS.
    "bomb: image_too_large (bomb.png: Image size (400000000 pixels) exceeds limit",
    "big: image_too_large (big.png has 1200000 pixels, more than max_pixels=1000000)",
    "missing: missing_image (images/missing.png not found)",
    "happy: unknown_label (label 'happy' is not one of negative, neutral, positive)",
    "escape: path_outside_input (path '../outside.png' resolves to ",
    "symlink: path_outside_input (path 'images/link.png' resolves to ",
]


@pytest.fixture(scope="module")
def bad_input_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    input_dir, pseudo_dir = write_bad_input(root / "raw")
    report = builder.build_dataset(
        "manifest",
        input_dir,
        root / "data",
        pseudo_dir=pseudo_dir,
        max_pixels=1_000_000,
    )
    return root, input_dir, pseudo_dir, report


def test_bad_input_report_lines(bad_input_build):
    root, _, _, report = bad_input_build
    dataset_dir = pathlib.Path(report.dataset_dir)
    assert dataset_dir == root / "data" / "fashion_posts" / "manifest" / "1.0.0"

    text_lines = (dataset_dir / "build_report.txt").read_text().splitlines()
    for expected in EXPECTED_SKIP_LINES:
        assert any(line.startswith("  " + expected) for line in text_lines), expected
    assert report.skip_counts == {
        "missing_image": 1,
        "unknown_label": 1,
        "path_outside_input": 2,
        "empty_image": 1,
        "unreadable_image": 2,
        "image_too_large": 2,
    }
    assert report.split_sizes == {"train": 1, "val": 1, "test": 1}


def test_bad_input_report_json(bad_input_build):
    _, _, _, report = bad_input_build
    saved = read_report(report.dataset_dir)
    assert saved["split_sizes"] == {"train": 1, "val": 1, "test": 1}
    assert {skip["id"] for skip in saved["skipped"]} == {
        "zero", "garbage", "truncated", "bomb", "big", "missing", "happy", "escape",
        "symlink",
    }  # fmt: skip
    assert saved["pseudo_counts"] == {
        "ok_lines": 4,
        "failed_lines": 2,
        "malformed_lines": 1,
        "described_posts": 3,
        "descriptions_without_image": 0,
        "images_without_description": 0,
        "unmatched_pseudo_records": 1,
    }
    problems = {
        problem["id"]: problem["reason"] for problem in saved["pseudo_problems"]
    }
    assert problems == {
        "descriptions.jsonl line 7": "malformed_record",
        "ok2": "unreadable_image",
    }
    assert saved["pseudo_sizes"] == {"train": 1, "val": 0, "test": 0}


def test_records_round_trip(bad_input_build):
    root, input_dir, pseudo_dir, _ = bad_input_build
    train = records_by_id(builder.load_split(root / "data", "manifest", "train"))
    val = records_by_id(builder.load_split(root / "data", "manifest", "val"))
    test = records_by_id(builder.load_split(root / "data", "manifest", "test"))
    assert (list(train), list(val), list(test)) == (["ok1"], ["ok2"], ["ok3"])

    ok1 = train["ok1"]
    assert ok1["text"] == b"text of ok1"
    assert ok1["attributes"] == b"category: dress; color: red"
    assert ok1["image"] == (input_dir / "images" / "ok1.png").read_bytes()
    assert ok1["label"] == 2
    assert bool(ok1["has_pseudo"]) is True
    # The last "ok" line wins; the later "failed" line is ignored.
    assert ok1["pseudo"]["description"] == b"a red dress"
    assert ok1["pseudo"]["attributes"] == b"category: dress; mood: cheerful"
    assert ok1["pseudo"]["image"] == (pseudo_dir / "images" / "ok1.png").read_bytes()
    assert json.loads(ok1["metadata"]) == {}

    # ok2's pseudo image is corrupt and ok3's description failed: both are kept
    # without pseudo data.
    for record, label in ((val["ok2"], 0), (test["ok3"], 1)):
        assert bool(record["has_pseudo"]) is False
        assert record["pseudo"]["image"] == b""
        assert record["pseudo"]["attributes"] == b""
        assert record["label"] == label


def test_strict_build_fails_and_leaves_nothing(tmp_path):
    input_dir, pseudo_dir = write_bad_input(tmp_path / "raw")
    with pytest.raises(builder.BuildError, match="happy: unknown_label") as caught:
        builder.build_dataset(
            "manifest", input_dir, tmp_path / "data", pseudo_dir=pseudo_dir, strict=True
        )
    assert len(caught.value.report.skipped) == 4
    assert not (tmp_path / "data" / "fashion_posts" / "manifest" / "1.0.0").exists()


def test_split_with_only_skipped_posts_is_left_out(tmp_path):
    input_dir = tmp_path / "input"
    write_manifest_dir(
        input_dir,
        [
            good_record("a"),
            good_record("b", split="val"),
            good_record("c", split="test"),
        ],
    )
    (input_dir / "images" / "c.png").write_bytes(b"")

    with pytest.raises(builder.BuildError, match="c: empty_image"):
        builder.build_dataset("manifest", input_dir, tmp_path / "data", strict=True)
    config_dir = tmp_path / "data" / "fashion_posts" / "manifest"
    assert list(config_dir.iterdir()) == []

    report = builder.build_dataset("manifest", input_dir, tmp_path / "data")
    assert report.split_sizes == {"train": 1, "val": 1}
    assert [path.name for path in config_dir.iterdir()] == ["1.0.0"]


def test_failure_while_writing_publishes_nothing(tmp_path, monkeypatch):
    input_dir = tmp_path / "input"
    write_manifest_dir(
        input_dir,
        [
            good_record("a"),
            good_record("b", split="val"),
            good_record("c", split="test"),
        ],
    )
    read_unchanged = builder._read_unchanged

    def fail_on_c(path, digest):
        if path.name == "c.png":
            raise OSError("disk failed")
        return read_unchanged(path, digest)

    # The test split is written last, after train and val are complete.
    monkeypatch.setattr(builder, "_read_unchanged", fail_on_c)
    with pytest.raises(OSError, match="disk failed"):
        builder.build_dataset("manifest", input_dir, tmp_path / "data")
    config_dir = tmp_path / "data" / "fashion_posts" / "manifest"
    assert list(config_dir.iterdir()) == []


def test_file_changed_during_build_is_an_error(tmp_path, monkeypatch):
    input_dir = tmp_path / "input"
    write_manifest_dir(input_dir, [good_record("a")])
    check_post = builder.FashionPosts._check_post

    def check_then_change(self, post):
        outcome = check_post(self, post)
        post.image_path.write_bytes(png_bytes(colour=(1, 2, 3)))
        return outcome

    monkeypatch.setattr(builder.FashionPosts, "_check_post", check_then_change)
    with pytest.raises(RuntimeError, match="a.png changed while the dataset"):
        builder.build_dataset("manifest", input_dir, tmp_path / "data")


def test_duplicate_id_fails_whole_build(tmp_path):
    input_dir = tmp_path / "input"
    write_manifest_dir(input_dir, [good_record("a"), good_record("a", split="val")])
    with pytest.raises(DuplicateIdError, match="'a'"):
        builder.build_dataset("manifest", input_dir, tmp_path / "data")
    assert not (tmp_path / "data" / "fashion_posts" / "manifest" / "1.0.0").exists()


def test_existing_dataset_needs_overwrite(tmp_path):
    input_dir = tmp_path / "input"
    write_manifest_dir(input_dir, [good_record("a")])
    builder.build_dataset("manifest", input_dir, tmp_path / "data")
    with pytest.raises(FileExistsError, match="overwrite"):
        builder.build_dataset("manifest", input_dir, tmp_path / "data")

    # A failed rebuild leaves the old dataset in place.
    write_manifest_dir(input_dir, [good_record("a"), good_record("b", label="happy")])
    with pytest.raises(builder.BuildError):
        builder.build_dataset(
            "manifest", input_dir, tmp_path / "data", overwrite=True, strict=True
        )
    assert len(builder.load_split(tmp_path / "data", "manifest", "train")) == 1

    write_manifest_dir(input_dir, [good_record("a"), good_record("b")])
    report = builder.build_dataset(
        "manifest", input_dir, tmp_path / "data", overwrite=True
    )
    assert report.split_sizes == {"train": 2}
    assert len(builder.load_split(tmp_path / "data", "manifest", "train")) == 2
    assert report.dataset_dir == str(
        tmp_path / "data" / "fashion_posts" / "manifest" / "1.0.0"
    )
    assert [path.name for path in (tmp_path / "data").iterdir()] == ["fashion_posts"]


def test_load_split_errors(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="launch.build_dataset --source=manifest"
    ):
        builder.load_split(tmp_path, "manifest", "train")
    input_dir = tmp_path / "input"
    write_manifest_dir(input_dir, [good_record("a")])
    builder.build_dataset("manifest", input_dir, tmp_path)
    with pytest.raises(ValueError, match="no 'test' split"):
        builder.load_split(tmp_path, "manifest", "test")


def _write_source(source: str, root: pathlib.Path) -> tuple[pathlib.Path, dict]:
    if source == "manifest":
        records = [
            good_record(f"m{i}", split=("train", "val")[i % 2]) for i in range(6)
        ]
        return write_manifest_dir(root, records), {}
    if source == "fashion_senti":
        return write_fashion_senti(root), {}
    if source == "mvsa_single":
        return write_mvsa(root, with_test_split=True), {}
    return root, {"num_posts": 24, "image_size": 16}


@pytest.mark.parametrize(
    "source", ["manifest", "fashion_senti", "mvsa_single", "synthetic"]
)
def test_each_source_builds(tmp_path, source):
    input_dir, options = _write_source(source, tmp_path / "input")
    report = builder.build_dataset(source, input_dir, tmp_path / "data", **options)

    imported = load_posts(source, input_dir, **options)
    expected = {}
    for post in imported.posts:
        expected[post.split] = expected.get(post.split, 0) + 1
    assert report.split_sizes == expected
    for split, size in expected.items():
        records = records_by_id(builder.load_split(tmp_path / "data", source, split))
        assert len(records) == size
        assert set(records) == {
            post.id for post in imported.posts if post.split == split
        }
    if source == "mvsa_single":
        record = records_by_id(builder.load_split(tmp_path / "data", source, "train"))[
            "2"
        ]
        assert json.loads(record["metadata"]) == {
            "image_label": "negative",
            "text_label": "neutral",
        }
    if source == "synthetic":
        assert sum(report.pseudo_sizes.values()) > 0
        assert report.pseudo_dir == str(input_dir / "pseudo")


def test_mvsa_shared_copy_build(mvsa_dir, tmp_path):
    report = builder.build_dataset("mvsa_single", mvsa_dir, tmp_path)

    assert report.split_sizes == {"train": 2706, "val": 902}
    assert report.drop_counts == {"label_conflict": 358}
    assert report.skipped == []
    assert len(builder.load_split(tmp_path, "mvsa_single", "val")) == 902
    # Checking 3,608 images takes about 10 s on 2 shared cores.
    print(f"MVSA-Single build: {report.build_seconds:.1f} s")
    assert report.build_seconds < 120


# The child process blocks every import of tensorflow, then builds, reads a
# split and runs the input pipeline, so none of them may need TensorFlow.
_NO_TENSORFLOW_SCRIPT = """
import json, sys

import importlib.util

if importlib.util.find_spec("tensorflow") is not None:
    sys.exit("the blocker did not hide tensorflow")
try:
    import tensorflow
except ImportError as error:
    blocked = str(error)
else:
    sys.exit("tensorflow imported despite the blocker")

from fashion_msa.clip.tokenizer import load_tokenizer
from fashion_msa.data import builder, pipeline

report = builder.build_dataset("synthetic", sys.argv[1], sys.argv[2], num_posts=12,
                               image_size=16)
source = builder.load_split(sys.argv[2], "synthetic", "train")
batch = next(iter(pipeline.make_eval_loader(
    source, global_batch_size=4, image_size=16, tokenizer=load_tokenizer(),
    process_index=0, process_count=1)))
print(json.dumps({
    "blocked": blocked,
    "split_sizes": report.split_sizes,
    "image_shape": list(batch["image"].shape),
    "tensorflow_loaded": "tensorflow" in sys.modules,
}))
"""

# Installed on sys.meta_path in place of the standard path finder, this makes
# the interpreter behave as if tensorflow were not installed, even where it is:
# importlib.util.find_spec("tensorflow") returns None (as etils checks) and
# `import tensorflow` raises ModuleNotFoundError.
_BLOCKER = """
import importlib.machinery
import sys


class PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [
    PathFinderWithoutTensorFlow if finder is importlib.machinery.PathFinder else finder
    for finder in sys.meta_path
]
"""


def test_build_and_read_without_tensorflow(tmp_path):
    blocker_dir = tmp_path / "blocker"
    blocker_dir.mkdir()
    (blocker_dir / "sitecustomize.py").write_text(textwrap.dedent(_BLOCKER))
    # Outside the repository the child imports fashion_msa as installed, which
    # for some editable installs means as a namespace package. The checkout is
    # the fallback when the package is not installed.
    python_path = [str(blocker_dir)]
    try:
        importlib.metadata.distribution("fashion_msa")
    except importlib.metadata.PackageNotFoundError:
        python_path.append(str(REPO_ROOT))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(python_path), JAX_PLATFORMS="cpu")

    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            _NO_TENSORFLOW_SCRIPT,
            str(tmp_path / "in"),
            str(tmp_path / "d"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["blocked"] == "No module named 'tensorflow'"
    assert sum(result["split_sizes"].values()) == 12
    assert result["image_shape"] == [4, 16, 16, 3]
    assert result["tensorflow_loaded"] is False


def test_cli_builds_synthetic(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.build_dataset",
            "--source=synthetic",
            f"--input_dir={tmp_path / 'in'}",
            f"--data_dir={tmp_path / 'data'}",
            "--num_posts=20",
            "--image_size=16",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "posts written: 20 (train 14, val 3, test 3)" in completed.stdout
    dataset_dir = tmp_path / "data" / "fashion_posts" / "synthetic" / "1.0.0"
    assert (dataset_dir / "build_report.json").is_file()
    assert (dataset_dir / "build_report.txt").read_text().strip() in completed.stdout


def test_cli_strict_failure_exit_status(tmp_path):
    input_dir = tmp_path / "input"
    write_manifest_dir(input_dir, [good_record("a"), good_record("b", label="happy")])
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.build_dataset",
            "--source=manifest",
            f"--input_dir={input_dir}",
            f"--data_dir={tmp_path / 'data'}",
            "--strict",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 1
    assert "b: unknown_label" in completed.stderr
