r"""Generate pseudo data for fashion posts: LLM descriptions, SD images, or rewrites.

Stages (each resumable; rerun the same command to finish an interrupted run):

  describe  an LLM writes a picture description and item attributes per post
            (any OpenAI-compatible endpoint; the key comes from OPENAI_API_KEY).
  render    Stable Diffusion turns each description into images/{id}.png.
  rotate, color, cutout
            a transformed copy of the post's own image, with its original
            attributes; no GPU or network needed.

Examples, from the repository root:

  OPENAI_API_KEY=... python -m launch.generate_pseudo --stage=describe \
      --source=mvsa_single --input=../shared/data/mvsa_single \
      --output_dir=/tmp/pseudo --base_url=http://127.0.0.1:8080/v1 --model=local

  python -m launch.generate_pseudo --stage=render --output_dir=/tmp/pseudo \
      --sd_model=runwayml/stable-diffusion-v1-5

  python -m launch.generate_pseudo --stage=rotate --source=manifest \
      --input=/data/posts/manifest.jsonl --output_dir=/tmp/pseudo_rotate

The output folder is what `launch.build_dataset --pseudo_dir` reads. A summary
(done, skipped, failed by reason, tokens, estimated cost) is printed at the end.
"""

import logging as std_logging
import sys

from absl import app, flags, logging

from fashion_msa.pseudo import describe, render, traditional
from fashion_msa.pseudo.inputs import SOURCES, load_input_posts

STAGES = ("describe", "render", *traditional.METHODS)

_STAGE = flags.DEFINE_enum("stage", None, list(STAGES), "Stage to run.")
_INPUT = flags.DEFINE_string(
    "input",
    None,
    "Posts to process: a manifest file (JSONL or CSV) or a source folder. "
    "Required except for render, where it limits rendering to these posts.",
)
_SOURCE = flags.DEFINE_enum("source", "manifest", list(SOURCES), "Format of --input.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Pseudo-data folder to write (and to resume from)."
)
_LIMIT = flags.DEFINE_integer(
    "limit", None, "Process only the first LIMIT posts of the input."
)
_RETRY_FAILED = flags.DEFINE_bool(
    "retry_failed", False, "Also retry posts whose last attempt failed."
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")

# describe
_BASE_URL = flags.DEFINE_string(
    "base_url",
    None,
    "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1 (default: the "
    "openai client's, OPENAI_BASE_URL or api.openai.com).",
)
_MODEL = flags.DEFINE_string("model", "gpt-3.5-turbo", "describe: chat model name.")
_MODE = flags.DEFINE_enum(
    "mode",
    "stream",
    ["stream", "batch"],
    "describe: send requests now (stream) or through the Batch API (half price, "
    "results within 24 h).",
)
_CONCURRENCY = flags.DEFINE_integer(
    "concurrency", 8, "describe: maximum requests in flight."
)
_RPM = flags.DEFINE_float(
    "requests_per_minute",
    500.0,
    "describe: maximum request starts per minute, retries included; 0 = no limit.",
)
_TIMEOUT = flags.DEFINE_float(
    "request_timeout_s", 60.0, "describe: limit on one request, in seconds."
)
_MAX_ATTEMPTS = flags.DEFINE_integer(
    "max_attempts", 6, "describe: attempts per post on 429, 5xx and timeouts."
)
_RETRY_DELAY = flags.DEFINE_float(
    "retry_base_delay_s",
    1.0,
    "describe: first backoff delay in seconds; doubles per attempt (Retry-After "
    "wins when the server sends it).",
)
_MAX_TOKENS = flags.DEFINE_integer(
    "max_tokens", 300, "describe: completion token budget per request."
)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "describe: sampling temperature.")
_RESPONSE_FORMAT = flags.DEFINE_enum(
    "response_format",
    "auto",
    ["auto", *describe.FORMAT_ORDER],
    "describe: auto tries json_schema, then json_object, then plain text as the "
    "endpoint rejects them (batch mode: json_schema).",
)
_PRICE_IN = flags.DEFINE_float(
    "price_input_per_mtok",
    None,
    "describe: USD per million prompt tokens (default: built-in table).",
)
_PRICE_OUT = flags.DEFINE_float(
    "price_output_per_mtok",
    None,
    "describe: USD per million completion tokens (default: built-in table).",
)
_POLL = flags.DEFINE_float(
    "batch_poll_interval_s", 30.0, "describe, batch mode: seconds between polls."
)

# render
_SD_MODEL = flags.DEFINE_string(
    "sd_model", render.DEFAULT_SD_MODEL, "render: hub id or local pipeline folder."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "render: prompts per call.")
_STEPS = flags.DEFINE_integer("num_inference_steps", 30, "render: denoising steps.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 7.5, "render: guidance scale.")
_HEIGHT = flags.DEFINE_integer("height", 512, "render: image height in pixels.")
_WIDTH = flags.DEFINE_integer("width", 512, "render: image width in pixels.")
_DEVICE = flags.DEFINE_string(
    "device", "auto", "render: auto (cuda, mps, cpu) or a torch device."
)
_SAFETY = flags.DEFINE_bool(
    "safety_checker",
    True,
    "render: keep the pipeline's safety checker. false renders without one and "
    "logs that with every image.",
)
_LOCAL_ONLY = flags.DEFINE_bool(
    "local_files_only", False, "render: never download the pipeline."
)

# render and traditional
_SEED = flags.DEFINE_integer(
    "seed", 0, "render, rotate, color, cutout: global seed, mixed with each post id."
)

flags.mark_flags_as_required(["stage", "output_dir"])


def _prices() -> tuple[float, float] | None:
    prices = (_PRICE_IN.value, _PRICE_OUT.value)
    if prices == (None, None):
        return None
    if None in prices:
        raise app.UsageError(
            "give both --price_input_per_mtok and --price_output_per_mtok"
        )
    return prices


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # The HTTP client logs every request at INFO; retries and failures are
    # logged by fashion_msa.pseudo itself.
    for name in ("httpx2", "httpx", "openai"):
        std_logging.getLogger(name).setLevel(std_logging.WARNING)
    stage = _STAGE.value
    posts = None
    if _INPUT.value:
        posts, skipped = load_input_posts(_SOURCE.value, _INPUT.value, _LIMIT.value)
        logging.info("Read %d posts (%d skipped) from %s", len(posts), len(skipped),
                     _INPUT.value)  # fmt: skip
    elif stage != "render":
        raise app.UsageError(f"--input is required for --stage={stage}")

    if stage == "describe":
        config = describe.DescribeConfig(
            model=_MODEL.value,
            base_url=_BASE_URL.value,
            concurrency=_CONCURRENCY.value,
            requests_per_minute=_RPM.value,
            request_timeout_s=_TIMEOUT.value,
            max_attempts=_MAX_ATTEMPTS.value,
            retry_base_delay_s=_RETRY_DELAY.value,
            max_tokens=_MAX_TOKENS.value,
            temperature=_TEMPERATURE.value,
            response_format=_RESPONSE_FORMAT.value,
            retry_failed=_RETRY_FAILED.value,
            prices=_prices(),
            mode=_MODE.value,
            batch_poll_interval_s=_POLL.value,
        )
        try:
            summary = describe.describe_posts(
                posts, _OUTPUT_DIR.value, config, progress=_PROGRESS.value
            )
        except describe.FatalRequestError as error:
            logging.error("describe stopped: %s", error)
            print(f"describe stopped: {error}", file=sys.stderr)
            return 1
    elif stage == "render":
        config = render.RenderConfig(
            sd_model=_SD_MODEL.value,
            batch_size=_BATCH_SIZE.value,
            num_inference_steps=_STEPS.value,
            guidance_scale=_GUIDANCE.value,
            height=_HEIGHT.value,
            width=_WIDTH.value,
            seed=_SEED.value,
            device=_DEVICE.value,
            safety_checker=_SAFETY.value,
            retry_failed=_RETRY_FAILED.value,
            local_files_only=_LOCAL_ONLY.value,
        )
        ids = [post.id for post in posts] if posts is not None else None
        summary = render.render_descriptions(
            _OUTPUT_DIR.value, config, ids=ids, progress=_PROGRESS.value
        )
    else:
        config = traditional.TraditionalConfig(
            method=stage, seed=_SEED.value, retry_failed=_RETRY_FAILED.value
        )
        summary = traditional.generate_traditional(
            posts, _OUTPUT_DIR.value, config, progress=_PROGRESS.value
        )

    print(summary.format(), flush=True)
    return 0


if __name__ == "__main__":
    app.run(main)
