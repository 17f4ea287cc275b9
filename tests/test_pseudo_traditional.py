"""Traditional pseudo images: rotate, color and cutout of the post's own image."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

from fashion_msa.data.posts import Post
from fashion_msa.data.pseudo_join import load_pseudo
from fashion_msa.pseudo import traditional
from fashion_msa.pseudo.layout import DESCRIPTIONS_FILE, IMAGES_LOG
from fashion_msa.pseudo.store import read_jsonl


def draw_image(path: pathlib.Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    pixels[4:20, 8:24] = (220, 40, 40)  # A saturated patch, so a hue shift shows.
    Image.fromarray(pixels).save(path)


@pytest.fixture
def posts(tmp_path) -> list[Post]:
    folder = tmp_path / "originals"
    folder.mkdir()
    created = []
    for i in range(3):
        draw_image(folder / f"{i}.png", i)
        created.append(
            Post(
                id=f"post{i}",
                text=f"text {i}",
                attributes="category: dress; color: red" if i else "",
                image_path=folder / f"{i}.png",
                label="neutral",
                split="train",
            )
        )
    return created


def run(posts, output_dir, method, **overrides):
    config = traditional.TraditionalConfig(method=method, **overrides)
    return traditional.generate_traditional(posts, output_dir, config, progress=False)


@pytest.mark.parametrize("method", traditional.METHODS)
def test_deterministic_and_keeps_attributes(posts, tmp_path, method):
    first, second = tmp_path / "first", tmp_path / "second"
    summary = run(posts, first, method)
    run(list(reversed(posts)), second, method)

    assert summary.done == 3
    assert not summary.failed
    for post in posts:
        produced = np.asarray(Image.open(first / "images" / f"{post.id}.png"))
        again = np.asarray(Image.open(second / "images" / f"{post.id}.png"))
        original = np.asarray(Image.open(post.image_path).convert("RGB"))
        np.testing.assert_array_equal(produced, again)
        assert produced.shape == original.shape
        assert not np.array_equal(produced, original)

    records = {r["id"]: r for r in read_jsonl(first / DESCRIPTIONS_FILE)}
    assert records["post1"]["attributes"] == {"category": "dress", "color": "red"}
    assert records["post0"]["attributes"] == {}
    assert all(r["image_description"] == "" for r in records.values())
    assert all(r["model"] == method for r in records.values())

    index = load_pseudo(first)
    assert sorted(index.records) == ["post0", "post1", "post2"]
    assert index.records["post1"].attributes == "category: dress; color: red"


def test_seed_changes_the_transform(posts, tmp_path):
    run(posts, tmp_path / "s0", "rotate", seed=0)
    run(posts, tmp_path / "s1", "rotate", seed=1)
    angles = [
        [r["params"]["angle_deg"] for r in read_jsonl(tmp_path / s / IMAGES_LOG)]
        for s in ("s0", "s1")
    ]
    assert angles[0] != angles[1]
    assert all(10 <= abs(angle) <= 45 for angle in angles[0])


def test_cutout_fills_a_square_with_the_clip_mean(posts, tmp_path):
    run(posts[:1], tmp_path, "cutout")
    params = read_jsonl(tmp_path / IMAGES_LOG)[0]["params"]
    pixels = np.asarray(Image.open(tmp_path / "images" / "post0.png"))
    top, left, side = params["top"], params["left"], params["side"]
    square = pixels[top : top + side, left : left + side]
    assert (square == traditional.FILL_RGB).all()
    assert 0.3 * 24 - 1 <= side <= 0.5 * 24 + 1


def test_rerun_skips_and_failures_are_recorded(posts, tmp_path):
    broken = Post(
        id="broken",
        text="x",
        attributes="",
        image_path=tmp_path / "broken.jpg",
        label="neutral",
        split="train",
    )
    broken.image_path.write_bytes(b"not an image")
    missing = Post("missing", "x", "", tmp_path / "nope.jpg", "neutral", "train")
    everything = [*posts, broken, missing]

    summary = run(everything, tmp_path / "out", "color")
    assert summary.done == 3
    assert summary.failed == {"unreadable_image": 1, "missing_image": 1}
    assert not (tmp_path / "out" / "images" / "broken.png").exists()

    rerun = run(everything, tmp_path / "out", "color")
    assert rerun.skipped == {"already_done": 3, "failed_before": 2}
    assert rerun.done == 0
    assert len(read_jsonl(tmp_path / "out" / DESCRIPTIONS_FILE)) == 3


def test_refuses_a_folder_of_another_generator(posts, tmp_path):
    run(posts, tmp_path, "rotate")
    with pytest.raises(ValueError, match="own output folder"):
        run(posts, tmp_path, "cutout")


def test_cli_rotate_from_a_manifest(posts, tmp_path):
    folder = posts[0].image_path.parent
    with open(folder / "manifest.jsonl", "w") as handle:
        for post in posts:
            row = {
                "id": post.id,
                "text": post.text,
                "image": post.image_path.name,
                "attributes": post.attributes,
                "label": post.label,
                "split": post.split,
            }
            handle.write(json.dumps(row) + "\n")
    command = [
        sys.executable,
        "-m",
        "launch.generate_pseudo",
        "--stage=rotate",
        "--source=manifest",
        f"--input={folder / 'manifest.jsonl'}",
        f"--output_dir={tmp_path / 'out'}",
        "--progress=false",
    ]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stage rotate: 3 items, 3 done now" in result.stdout
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 3
