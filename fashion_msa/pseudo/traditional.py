"""Traditional pseudo images: rotate, colour change and cutout of the original image.

These are the image-rewriting baselines of Zhao et al. (COLING 2025, Figure 5
a-c): the pseudo image is a transformed copy of the post's own image, and the
original attributes are kept as pseudo attributes. They need no GPU and no
network. The output folder has the layout the render stage writes, with an empty
`image_description`, so the dataset builder reads it the same way. Each post's
transform is drawn from a generator seeded by its id, the global seed and the
method name, so reruns reproduce it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image, ImageEnhance

from fashion_msa.clip.image_processing import CLIP_MEAN, ImageDecodeError, decode_image
from fashion_msa.data.posts import Post
from fashion_msa.pseudo.inputs import parse_attributes
from fashion_msa.pseudo.layout import DESCRIPTIONS_FILE, IMAGES_DIR, IMAGES_LOG
from fashion_msa.pseudo.render import derive_seed, write_png_atomically
from fashion_msa.pseudo.report import RunSummary
from fashion_msa.pseudo.store import JsonlLog, read_jsonl

METHODS = ("rotate", "color", "cutout")
# Fill for uncovered corners and cut-out squares: the CLIP mean colour, which
# CLIP's normalisation maps to zero, so the filled area carries no signal.
FILL_RGB = tuple(round(255 * channel) for channel in CLIP_MEAN)


@dataclasses.dataclass(frozen=True)
class TraditionalConfig:
    """Settings of the traditional generators.

    Attributes:
      method: "rotate", "color" or "cutout".
      seed: global seed, combined with each post id and the method.
      rotation_deg: range of the rotation magnitude in degrees; the sign is
        drawn separately.
      hue_shift: range of the hue rotation magnitude, in turns.
      saturation: range of the saturation factor (1 keeps it).
      brightness: range of the brightness factor.
      contrast: range of the contrast factor.
      cutout_side: range of the cut-out square's side, as a fraction of the
        shorter image side.
      retry_failed: try again the posts whose last attempt failed.
    """

    method: str
    seed: int = 0
    rotation_deg: tuple[float, float] = (10.0, 45.0)
    hue_shift: tuple[float, float] = (0.1, 0.4)
    saturation: tuple[float, float] = (0.6, 1.4)
    brightness: tuple[float, float] = (0.7, 1.3)
    contrast: tuple[float, float] = (0.7, 1.3)
    cutout_side: tuple[float, float] = (0.3, 0.5)
    retry_failed: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {METHODS}")


def rotate_image(
    image: Image.Image, rng: np.random.Generator, config: TraditionalConfig
) -> tuple[Image.Image, dict[str, Any]]:
    """Rotate about the centre, keeping the size; return (image, parameters)."""
    angle = float(rng.uniform(*config.rotation_deg) * rng.choice([-1.0, 1.0]))
    rotated = image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=FILL_RGB)
    return rotated, {"angle_deg": round(angle, 3)}


def recolor_image(
    image: Image.Image, rng: np.random.Generator, config: TraditionalConfig
) -> tuple[Image.Image, dict[str, Any]]:
    """Shift the hue and scale saturation, brightness and contrast."""
    shift = float(rng.uniform(*config.hue_shift) * rng.choice([-1.0, 1.0]))
    saturation = float(rng.uniform(*config.saturation))
    brightness = float(rng.uniform(*config.brightness))
    contrast = float(rng.uniform(*config.contrast))

    hsv = np.asarray(image.convert("HSV"), dtype=np.uint8).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(shift * 256)) % 256
    recolored = Image.fromarray(hsv, mode="HSV").convert("RGB")
    recolored = ImageEnhance.Color(recolored).enhance(saturation)
    recolored = ImageEnhance.Brightness(recolored).enhance(brightness)
    recolored = ImageEnhance.Contrast(recolored).enhance(contrast)
    params = {
        "hue_shift": round(shift, 4),
        "saturation": round(saturation, 4),
        "brightness": round(brightness, 4),
        "contrast": round(contrast, 4),
    }
    return recolored, params


def cutout_image(
    image: Image.Image, rng: np.random.Generator, config: TraditionalConfig
) -> tuple[Image.Image, dict[str, Any]]:
    """Fill a random square with the CLIP mean colour (DeVries and Taylor's Cutout)."""
    width, height = image.size
    side = max(1, round(rng.uniform(*config.cutout_side) * min(width, height)))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    pixels = np.asarray(image, dtype=np.uint8).copy()
    pixels[top : top + side, left : left + side] = FILL_RGB
    params = {"left": left, "top": top, "side": side}
    return Image.fromarray(pixels), params


TRANSFORMS: dict[str, Callable[..., tuple[Image.Image, dict[str, Any]]]] = {
    "rotate": rotate_image,
    "color": recolor_image,
    "cutout": cutout_image,
}


def transform_post_image(
    post_id: str, image: Image.Image, config: TraditionalConfig
) -> tuple[Image.Image, dict[str, Any], int]:
    """Apply the method with the post's own seed; return (image, params, seed)."""
    seed = derive_seed(post_id, config.seed, salt=config.method)
    rng = np.random.default_rng(seed)
    transformed, params = TRANSFORMS[config.method](image.convert("RGB"), rng, config)
    return transformed, params, seed


def _check_folder(
    records: list[dict[str, Any]], method: str, path: pathlib.Path
) -> None:
    others = {r.get("model") for r in records if r.get("status") == "ok"} - {method}
    if others:
        raise ValueError(
            f"{path} already contains pseudo data from {sorted(map(str, others))}; "
            f"write each generator to its own output folder"
        )


def generate_traditional(
    posts: Sequence[Post],
    output_dir: str | os.PathLike[str],
    config: TraditionalConfig,
    progress: bool = True,
) -> RunSummary:
    """Write a transformed copy of each post's image and its original attributes.

    Raises:
      ValueError: the folder already contains pseudo data of another generator.
    """
    from tqdm import tqdm

    output_dir = pathlib.Path(output_dir)
    images_dir = output_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    descriptions_path = output_dir / DESCRIPTIONS_FILE
    description_records = read_jsonl(descriptions_path)
    _check_folder(description_records, config.method, descriptions_path)
    described = {r["id"] for r in description_records if r.get("status") == "ok"}
    last_attempt = {
        r["id"]: r for r in read_jsonl(output_dir / IMAGES_LOG) if "id" in r
    }
    summary = RunSummary(stage=config.method, total=len(posts))

    with (
        JsonlLog(descriptions_path) as descriptions,
        JsonlLog(output_dir / IMAGES_LOG) as log,
        tqdm(
            total=len(posts), desc=config.method, unit="img", disable=not progress
        ) as bar,
    ):
        for post in posts:
            bar.update(1)
            image_path = images_dir / f"{post.id}.png"
            description = {
                "id": post.id,
                "status": "ok",
                "image_description": "",
                "attributes": parse_attributes(post.attributes),
                "prompt_hash": "",
                "model": config.method,
            }
            if image_path.is_file():
                summary.skipped["already_done"] += 1
                if post.id not in described:
                    # A run killed between the image and its description.
                    descriptions.append(description)
                continue
            if last_attempt.get(post.id, {}).get("status") == "failed" and not (
                config.retry_failed
            ):
                summary.skipped["failed_before"] += 1
                continue

            entry = {"id": post.id, "model": config.method, "prompt": "", "steps": 0}
            try:
                original = decode_image(pathlib.Path(post.image_path).read_bytes())
            except (OSError, ImageDecodeError) as error:
                reason = (
                    "missing_image"
                    if isinstance(error, FileNotFoundError)
                    else "unreadable_image"
                )
                logging.warning("Post %s: %s (%s)", post.id, reason, error)
                log.append({**entry, "status": "failed", "reason": reason})
                summary.failed[reason] += 1
                continue

            transformed, params, seed = transform_post_image(post.id, original, config)
            write_png_atomically(image_path, np.asarray(transformed, dtype=np.uint8))
            log.append({**entry, "status": "ok", "seed": seed, "params": params})
            descriptions.append(description)
            summary.done += 1
    return summary
