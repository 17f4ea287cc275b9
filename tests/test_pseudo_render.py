"""Stage 2 with a tiny Stable Diffusion pipeline assembled from random weights.

The pipelines are saved to a temporary folder and loaded back through
`render.load_pipeline`, the code path a user's hub id or local folder takes.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import (
    StableDiffusionSafetyChecker,
)
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
)

from fashion_msa.clip.tokenizer import build_vocab_files
from fashion_msa.data.pseudo_join import load_pseudo
from fashion_msa.pseudo import render
from fashion_msa.pseudo.layout import DESCRIPTIONS_FILE, IMAGES_LOG
from fashion_msa.pseudo.store import JsonlLog, read_jsonl

IMAGE_SIDE = 16
LONG_DESCRIPTION = "A model in a long flowing floral summer dress " * 12


def _tiny_components(tmp: pathlib.Path) -> dict:
    torch.manual_seed(0)
    build_vocab_files(tmp / "vocab")
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "vocab", model_max_length=77)
    # OpenAI's CLIP ids for "a photo of a cat", between start and end tokens.
    assert tokenizer("a photo of a cat").input_ids[1:-1] == [320, 1125, 539, 320, 2368]
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            eos_token_id=49407,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIDE // 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIDE,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )


def _safety_checker(flag_everything: bool) -> tuple:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = CLIPConfig(
        text_config=CLIPTextConfig(hidden_size=32, intermediate_size=64).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config)
    # A concept fires when cosine similarity exceeds its weight: a weight of -2
    # fires for every image, a weight of 2 (above any cosine) never does.
    weight = -2.0 if flag_everything else 2.0
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(weight)
        checker.special_care_embeds_weights.fill_(weight)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return checker, processor


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Save the pipeline variants; return their folders by name."""
    root = tmp_path_factory.mktemp("sd")
    components = _tiny_components(root)
    folders = {}

    def save(name, safety_checker=None, feature_extractor=None, vae=None):
        pipeline = StableDiffusionPipeline(
            **{**components, **({"vae": vae} if vae is not None else {})},
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            requires_safety_checker=safety_checker is not None,
        )
        pipeline.save_pretrained(root / name)
        folders[name] = root / name

    save("checked", *_safety_checker(flag_everything=False))
    save("flagging", *_safety_checker(flag_everything=True))
    save("unchecked")
    for name, bias in (("black", -10.0), ("nan", float("nan"))):
        vae = AutoencoderKL.from_config(components["vae"].config)
        vae.load_state_dict(components["vae"].state_dict())
        with torch.no_grad():
            # The decoder's last layer then outputs a constant: -10 is black
            # after the pipeline maps [-1, 1] to [0, 1]; NaN stays NaN.
            vae.decoder.conv_out.weight.zero_()
            vae.decoder.conv_out.bias.fill_(bias)
        save(name, vae=vae)
    return folders


def write_descriptions(output_dir: pathlib.Path, descriptions: dict[str, str]) -> None:
    with JsonlLog(output_dir / DESCRIPTIONS_FILE) as log:
        for post_id, text in descriptions.items():
            log.append(
                {
                    "id": post_id,
                    "status": "ok",
                    "image_description": text,
                    "attributes": {"color": "red", "category": "dress"},
                    "prompt_hash": "test",
                    "model": "test",
                }
            )


def tiny_config(folder: pathlib.Path, **overrides) -> render.RenderConfig:
    settings = dict(
        sd_model=str(folder),
        batch_size=2,
        num_inference_steps=2,
        guidance_scale=5.0,
        height=IMAGE_SIDE,
        width=IMAGE_SIDE,
        seed=7,
        local_files_only=True,
    )
    settings.update(overrides)
    return render.RenderConfig(**settings)


DESCRIPTIONS = {
    "a": "A woman in a red floral dress smiling",
    "b": "A man in a black leather jacket, moody",
    "c": LONG_DESCRIPTION,
}


def test_render_writes_images_and_log(pipelines, tmp_path):
    write_descriptions(tmp_path, DESCRIPTIONS)
    summary = render.render_descriptions(
        tmp_path, tiny_config(pipelines["checked"]), progress=False
    )

    assert summary.done == 3
    assert not summary.failed
    assert summary.notes["safety_checker"] == "on"
    assert summary.notes["truncated_descriptions"] == 1
    for post_id in DESCRIPTIONS:
        image = Image.open(tmp_path / "images" / f"{post_id}.png")
        assert image.size == (IMAGE_SIDE, IMAGE_SIDE)
        assert image.mode == "RGB"
    log = {r["id"]: r for r in read_jsonl(tmp_path / IMAGES_LOG)}
    assert log["a"]["seed"] == render.derive_seed("a", 7)
    assert log["a"]["model"] == str(pipelines["checked"])
    assert log["a"]["steps"] == 2
    assert log["a"]["status"] == "ok"
    assert log["a"]["prompt"] == DESCRIPTIONS["a"]
    assert not log["a"]["truncated"]
    assert log["c"]["truncated"]
    truncated = log["c"]["prompt"]
    assert 100 < len(truncated) < len(LONG_DESCRIPTION)
    assert LONG_DESCRIPTION.lower().startswith(truncated[:40])
    tokenizer = CLIPTokenizer.from_pretrained(pipelines["checked"] / "tokenizer")
    assert len(tokenizer(truncated).input_ids) <= 77
    assert not list((tmp_path / "images").glob(".*.tmp"))

    # The dataset builder's reader sees every post as having pseudo data.
    index = load_pseudo(tmp_path)
    assert sorted(index.records) == ["a", "b", "c"]
    assert index.records["a"].attributes == "color: red; category: dress"


def test_same_seed_same_pixels_in_any_batch(pipelines, tmp_path):
    alone, mixed = tmp_path / "alone", tmp_path / "mixed"
    write_descriptions(alone, {"a": DESCRIPTIONS["a"]})
    write_descriptions(mixed, {"b": DESCRIPTIONS["b"], "a": DESCRIPTIONS["a"]})
    write_descriptions(mixed, {"c": DESCRIPTIONS["c"]})
    pipeline, _ = render.load_pipeline(
        tiny_config(pipelines["unchecked"], safety_checker=False)
    )

    render.render_descriptions(
        alone, tiny_config(pipelines["unchecked"], batch_size=1), pipeline=pipeline,
        progress=False,
    )  # fmt: skip
    render.render_descriptions(
        mixed, tiny_config(pipelines["unchecked"], batch_size=3), pipeline=pipeline,
        progress=False,
    )  # fmt: skip

    first = np.asarray(Image.open(alone / "images" / "a.png"), dtype=np.int16)
    second = np.asarray(Image.open(mixed / "images" / "a.png"), dtype=np.int16)
    # The starting noise is identical; batched kernels may round the float
    # pixels differently, which can move a value across a uint8 step.
    assert np.abs(first - second).max() <= 1
    other = np.asarray(Image.open(mixed / "images" / "b.png"), dtype=np.int16)
    assert np.abs(first - other).max() > 10  # A different post differs.


def test_rerun_skips_without_loading(pipelines, tmp_path):
    write_descriptions(tmp_path, DESCRIPTIONS)
    render.render_descriptions(
        tmp_path, tiny_config(pipelines["checked"]), progress=False
    )
    images = sorted((tmp_path / "images").glob("*.png"))
    stamps = [os.stat(path).st_mtime_ns for path in images]

    # A missing model proves nothing is loaded when all images exist.
    missing = tiny_config(tmp_path / "no_such_pipeline")
    summary = render.render_descriptions(tmp_path, missing, progress=False)

    assert summary.skipped == {"already_done": 3}
    assert summary.done == 0
    assert [os.stat(path).st_mtime_ns for path in images] == stamps


def test_ids_without_description_are_skipped(tmp_path):
    write_descriptions(tmp_path, {"a": DESCRIPTIONS["a"]})
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "images" / "a.png")
    summary = render.render_descriptions(
        tmp_path, tiny_config(tmp_path / "unused"), ids=["a", "x"], progress=False
    )
    assert summary.total == 2
    assert summary.skipped == {"already_done": 1, "no_description": 1}


def test_rerun_logs_image_without_log_line(pipelines, tmp_path):
    write_descriptions(tmp_path, {"a": DESCRIPTIONS["a"]})
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "images" / "a.png")
    summary = render.render_descriptions(
        tmp_path, tiny_config(tmp_path / "unused"), progress=False
    )
    assert summary.skipped == {"already_done": 1}
    assert read_jsonl(tmp_path / IMAGES_LOG)[0]["status"] == "ok"


@pytest.mark.parametrize(
    "variant, reason",
    [("black", render.BLACK_IMAGE), ("nan", render.NAN_IMAGE)],
)
def test_broken_output_is_a_failure(pipelines, tmp_path, variant, reason):
    write_descriptions(tmp_path, {"a": DESCRIPTIONS["a"], "b": DESCRIPTIONS["b"]})
    config = tiny_config(pipelines[variant], safety_checker=False)
    summary = render.render_descriptions(tmp_path, config, progress=False)

    assert summary.failed == {reason: 2}
    assert summary.done == 0
    assert not list((tmp_path / "images").glob("*.png"))
    log = read_jsonl(tmp_path / IMAGES_LOG)
    assert [(r["status"], r["reason"]) for r in log] == [("failed", reason)] * 2
    assert all(r["safety_checker"] is False for r in log)

    rerun = render.render_descriptions(tmp_path, config, progress=False)
    assert rerun.skipped == {"failed_before": 2}


def test_safety_checker_blank_is_a_failure(pipelines, tmp_path):
    write_descriptions(tmp_path, {"a": DESCRIPTIONS["a"]})
    summary = render.render_descriptions(
        tmp_path, tiny_config(pipelines["flagging"]), progress=False
    )
    assert summary.failed == {render.NSFW_BLANKED: 1}
    assert not (tmp_path / "images" / "a.png").exists()


def test_missing_safety_checker_is_an_error(pipelines):
    with pytest.raises(ValueError, match="--safety_checker=false"):
        render.load_pipeline(tiny_config(pipelines["unchecked"]))


def test_cpu_loads_float32(pipelines):
    pipeline, device = render.load_pipeline(tiny_config(pipelines["checked"]))
    if not torch.cuda.is_available():
        assert device == "cpu"
        assert pipeline.unet.dtype == torch.float32


def test_derive_seed_depends_on_post_and_seed():
    assert render.derive_seed("a", 0) == render.derive_seed("a", 0)
    assert render.derive_seed("a", 0) != render.derive_seed("b", 0)
    assert render.derive_seed("a", 0) != render.derive_seed("a", 1)
    assert 0 <= render.derive_seed("a", 0) < 2**63


def test_cli_renders_and_prints_summary(pipelines, tmp_path):
    write_descriptions(tmp_path, {"a": DESCRIPTIONS["a"]})
    command = [
        sys.executable,
        "-m",
        "launch.generate_pseudo",
        "--stage=render",
        f"--output_dir={tmp_path}",
        f"--sd_model={pipelines['unchecked']}",
        "--safety_checker=false",
        "--num_inference_steps=2",
        f"--height={IMAGE_SIDE}",
        f"--width={IMAGE_SIDE}",
        "--local_files_only",
        "--progress=false",
    ]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stage render: 1 items, 1 done now" in result.stdout
    assert "safety_checker: OFF" in result.stdout
    assert (tmp_path / "images" / "a.png").is_file()
    log = read_jsonl(tmp_path / IMAGES_LOG)
    assert json.dumps(log[0]["safety_checker"]) == "false"
