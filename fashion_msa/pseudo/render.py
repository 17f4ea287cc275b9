"""Stage 2: pseudo images from stage-1 descriptions with diffusers' Stable Diffusion.

Each post's image is generated with its own `torch.Generator`, seeded from the
post id and a global seed, so a post gets the same starting noise whatever batch
it lands in. Images are written as `images/{id}.png` (a temporary file, then
`os.replace`), and each attempt is logged to `images.jsonl`. An image that the
safety checker blanked, or that is all black or contains NaN, is logged as a
failure and never written. PyTorch and diffusers are imported only here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Iterable
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from fashion_msa.pseudo.layout import DESCRIPTIONS_FILE, IMAGES_DIR, IMAGES_LOG
from fashion_msa.pseudo.report import RunSummary
from fashion_msa.pseudo.store import JsonlLog, read_jsonl

DEFAULT_SD_MODEL = "runwayml/stable-diffusion-v1-5"
# An image whose brightest uint8 value is at most this is treated as blank: the
# safety checker returns exact zeros, and a broken VAE returns near-black.
BLACK_MAX_VALUE = 3

NSFW_BLANKED = "nsfw_blanked"
BLACK_IMAGE = "black_image"
NAN_IMAGE = "nan_image"


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """Settings of stage 2.

    Attributes:
      sd_model: a Hugging Face hub id or a local pipeline directory.
      batch_size: prompts per pipeline call.
      num_inference_steps: denoising steps.
      guidance_scale: classifier-free guidance scale.
      height: image height in pixels (a multiple of 8).
      width: image width in pixels (a multiple of 8).
      seed: global seed, combined with each post id.
      device: "auto" (cuda, then mps, then cpu), or a torch device string.
      safety_checker: keep the pipeline's safety checker; False drops it, and
        the choice is logged with every image.
      retry_failed: render again the posts whose last attempt failed.
      local_files_only: never download; load `sd_model` from the local cache.
    """

    sd_model: str = DEFAULT_SD_MODEL
    batch_size: int = 4
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    seed: int = 0
    device: str = "auto"
    safety_checker: bool = True
    retry_failed: bool = False
    local_files_only: bool = False


def derive_seed(post_id: str, seed: int, salt: str = "") -> int:
    """Return a 63-bit seed for one post, from its id and the global seed."""
    digest = hashlib.sha256(f"{seed}/{salt}/{post_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def choose_device(requested: str = "auto") -> str:
    """Return `requested`, or for "auto" the first of cuda, mps, cpu available."""
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _dtype_argument() -> str:
    """Return the name of from_pretrained's dtype argument.

    diffusers 0.42 (tested) takes `dtype` and warns on `torch_dtype`; older
    releases are given `torch_dtype`, which they all accept.
    """
    import diffusers

    version = tuple(int(part) for part in diffusers.__version__.split(".")[:2])
    return "dtype" if version >= (0, 42) else "torch_dtype"


def load_pipeline(config: RenderConfig) -> tuple[Any, str]:
    """Load the Stable Diffusion pipeline; return (pipeline, device).

    fp16 is used on cuda only, because fp16 on cpu is slow or unsupported and
    on mps it produces black images with some diffusers versions.

    Raises:
      ValueError: the safety checker is requested but the pipeline has none.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    device = choose_device(config.device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    options: dict[str, Any] = {
        _dtype_argument(): dtype,
        "local_files_only": config.local_files_only,
    }
    if not config.safety_checker:
        options.update(safety_checker=None, requires_safety_checker=False)
    pipeline = StableDiffusionPipeline.from_pretrained(config.sd_model, **options)
    if config.safety_checker and pipeline.safety_checker is None:
        raise ValueError(
            f"the pipeline {config.sd_model} has no safety checker. Pass "
            "--safety_checker=false to render without one."
        )
    pipeline.set_progress_bar_config(disable=True)
    logging.info(
        "Loaded %s on %s (%s), safety checker %s",
        config.sd_model,
        device,
        dtype,
        "on" if config.safety_checker else "OFF",
    )
    return pipeline.to(device), device


def find_image_problem(image: np.ndarray, nsfw: bool | None) -> str | None:
    """Return why a generated image is unusable, or None.

    Args:
      image: float pixels in [0, 1], (height, width, 3).
      nsfw: the safety checker's flag for this image; None without a checker.
    """
    if nsfw:
        return NSFW_BLANKED
    if not np.isfinite(image).all():
        return NAN_IMAGE
    if to_uint8(image).max() <= BLACK_MAX_VALUE:
        return BLACK_IMAGE
    return None


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert float pixels in [0, 1] to uint8, rounding as diffusers' numpy_to_pil."""
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_png_atomically(path: pathlib.Path, pixels: np.ndarray) -> None:
    """Write a uint8 (height, width, 3) image so `path` is either whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        Image.fromarray(pixels).save(handle, format="PNG")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_descriptions(output_dir: pathlib.Path) -> dict[str, dict[str, Any]]:
    """Return the last "ok" description record per post id."""
    latest: dict[str, dict[str, Any]] = {}
    for record in read_jsonl(output_dir / DESCRIPTIONS_FILE):
        if record.get("status") == "ok" and record.get("image_description"):
            latest[record["id"]] = record
    return latest


def truncate_prompt(tokenizer: Any, prompt: str) -> tuple[str, bool]:
    """Cut `prompt` to what the text encoder reads; return (prompt, was_cut).

    CLIP's text encoder reads 77 tokens, start and end tokens included. The pipeline
    would cut a longer prompt itself; cutting here lets the log record the prompt
    that was used and the run count the cuts.
    """
    max_length = tokenizer.model_max_length
    ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
    if len(ids) <= max_length:
        return prompt, False
    truncated = tokenizer.decode(ids[1 : max_length - 1], skip_special_tokens=True)
    return truncated.strip(), True


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def render_descriptions(
    output_dir: str | os.PathLike[str],
    config: RenderConfig,
    ids: Iterable[str] | None = None,
    pipeline: Any = None,
    progress: bool = True,
) -> RunSummary:
    """Render a pseudo image for every described post without one.

    Args:
      output_dir: the pseudo-data folder with descriptions.jsonl.
      config: render settings.
      ids: render only these post ids (default: every described post). Ids
        without an "ok" description are counted as skipped.
      pipeline: an already loaded pipeline; by default `load_pipeline(config)`.
      progress: show a progress bar.
    """
    import torch
    from tqdm import tqdm

    output_dir = pathlib.Path(output_dir)
    images_dir = output_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob(".*.png.tmp"):
        stale.unlink()  # Left by a run killed while writing; never a whole image.

    descriptions = load_descriptions(output_dir)
    summary = RunSummary(stage="render", total=len(descriptions))
    if ids is not None:
        selected = list(dict.fromkeys(ids))
        summary.total = len(selected)
        undescribed = sum(i not in descriptions for i in selected)
        if undescribed:
            summary.skipped["no_description"] = undescribed
        descriptions = {i: descriptions[i] for i in selected if i in descriptions}

    last_attempt = {
        r["id"]: r for r in read_jsonl(output_dir / IMAGES_LOG) if "id" in r
    }
    todo = []
    with JsonlLog(output_dir / IMAGES_LOG) as log:
        for post_id, record in descriptions.items():
            if (images_dir / f"{post_id}.png").is_file():
                summary.skipped["already_done"] += 1
                if last_attempt.get(post_id, {}).get("status") != "ok":
                    # A run killed between writing the image and its log line.
                    log.append(
                        {
                            "id": post_id,
                            "status": "ok",
                            "seed": derive_seed(post_id, config.seed),
                            "model": config.sd_model,
                            "note": "image found on rerun without its log line",
                        }
                    )
            elif (
                last_attempt.get(post_id, {}).get("status") == "failed"
                and not config.retry_failed
            ):
                summary.skipped["failed_before"] += 1
            else:
                todo.append((post_id, record["image_description"]))

        summary.notes["safety_checker"] = "on" if config.safety_checker else "OFF"
        if not todo:
            return summary
        if pipeline is None:
            pipeline, device = load_pipeline(config)
        else:
            device = str(pipeline.device)
        summary.notes["device"] = device
        truncated = 0

        with tqdm(
            total=len(todo), desc="render", unit="img", disable=not progress
        ) as bar:
            for chunk in _chunks(todo, config.batch_size):
                prompts, cut_flags, seeds = [], [], []
                for post_id, description in chunk:
                    prompt, cut = truncate_prompt(pipeline.tokenizer, description)
                    prompts.append(prompt)
                    cut_flags.append(cut)
                    seeds.append(derive_seed(post_id, config.seed))
                truncated += sum(cut_flags)
                # CPU generators give the same noise on every device.
                generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
                output = pipeline(
                    prompt=prompts,
                    num_inference_steps=config.num_inference_steps,
                    guidance_scale=config.guidance_scale,
                    height=config.height,
                    width=config.width,
                    generator=generators,
                    output_type="np",
                )
                nsfw_flags = output.nsfw_content_detected or [None] * len(chunk)
                summary.requests += len(chunk)
                for index, (post_id, _) in enumerate(chunk):
                    image = np.asarray(output.images[index], dtype=np.float32)
                    problem = find_image_problem(image, nsfw_flags[index])
                    entry = {
                        "id": post_id,
                        "status": "failed" if problem else "ok",
                        "seed": seeds[index],
                        "model": config.sd_model,
                        "prompt": prompts[index],
                        "truncated": cut_flags[index],
                        "steps": config.num_inference_steps,
                        "guidance_scale": config.guidance_scale,
                        "height": config.height,
                        "width": config.width,
                        "safety_checker": config.safety_checker,
                    }
                    if problem:
                        logging.warning("Image of post %s failed: %s", post_id, problem)
                        log.append({**entry, "reason": problem})
                        summary.failed[problem] += 1
                    else:
                        write_png_atomically(
                            images_dir / f"{post_id}.png", to_uint8(image)
                        )
                        log.append(entry)
                        summary.done += 1
                bar.update(len(chunk))
        summary.notes["truncated_descriptions"] = truncated
    return summary
