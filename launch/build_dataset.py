r"""Build a fashion-post TFDS dataset from one source, with a build report.

Examples, from the repository root:

  python -m launch.build_dataset --source=mvsa_single \
      --input_dir=../shared/data/mvsa_single --data_dir=/tmp/fashion_msa_data

  python -m launch.build_dataset --source=synthetic \
      --input_dir=/tmp/synthetic_posts --data_dir=/tmp/fashion_msa_data

The dataset lands in DATA_DIR/fashion_posts/SOURCE/1.0.0 together with
build_report.json and build_report.txt. The report is also printed. The exit
status is 1 when the build fails (a strict build with skipped posts, a
duplicate id, an unsafe pickle, a missing input).
"""

import pickle
import sys

import tensorflow_datasets as tfds
from absl import app, flags, logging

from fashion_msa.data import builder, importers
from fashion_msa.data.posts import SPLITS

_SOURCE = flags.DEFINE_enum(
    "source", None, list(importers.SOURCES), "Source to import."
)
_INPUT_DIR = flags.DEFINE_string(
    "input_dir",
    None,
    "Input folder of the source (a manifest file also works for manifest). "
    "For synthetic, the folder the posts are drawn into: empty, or drawn "
    "before with the same --num_posts, --image_size and --seed.",
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory to build into.")
_PSEUDO_DIR = flags.DEFINE_string(
    "pseudo_dir",
    None,
    "Pseudo-data folder (descriptions.jsonl, images/) to join by post id. "
    "Synthetic uses INPUT_DIR/pseudo when unset.",
)
_STRICT = flags.DEFINE_bool(
    "strict", False, "Fail the build on any skipped post or pseudo-data problem."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing build.")
_MAX_PIXELS = flags.DEFINE_integer(
    "max_pixels",
    builder.DEFAULT_MAX_PIXELS,
    "Largest width * height accepted for an image; larger images are skipped.",
)
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers",
    None,
    "Threads that read and decode images (default: CPUs, at most 8).",
)
_MANIFEST = flags.DEFINE_string(
    "manifest", None, "manifest: file name inside --input_dir (default: manifest.jsonl "
    "or manifest.csv)."
)  # fmt: skip
_LABEL_NAMES = flags.DEFINE_list(
    "label_names",
    None,
    "fashion_senti: class name of each integer label, in order, e.g. "
    "negative,neutral,positive.",
)
_DEFAULT_SPLIT = flags.DEFINE_enum(
    "default_split",
    None,
    list(SPLITS),
    "mvsa_single: split of posts that no split file lists (default: skip them).",
)
_NUM_POSTS = flags.DEFINE_integer("num_posts", 600, "synthetic: number of posts.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 64, "synthetic: side of the drawn images, in pixels."
)
_SEED = flags.DEFINE_integer("seed", 0, "synthetic: random seed.")

flags.mark_flags_as_required(["source", "input_dir", "data_dir"])


def _source_options(source: str) -> dict:
    if source == "manifest":
        return {"manifest": _MANIFEST.value}
    if source == "fashion_senti":
        return {"label_names": _LABEL_NAMES.value}
    if source == "mvsa_single":
        return {"default_split": _DEFAULT_SPLIT.value}
    return {
        "num_posts": _NUM_POSTS.value,
        "image_size": _IMAGE_SIZE.value,
        "seed": _SEED.value,
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # Our per-split bar counts posts and skips; TFDS's own bars would interleave.
    tfds.disable_progress_bar()
    try:
        report = builder.build_dataset(
            _SOURCE.value,
            _INPUT_DIR.value,
            _DATA_DIR.value,
            pseudo_dir=_PSEUDO_DIR.value,
            strict=_STRICT.value,
            max_pixels=_MAX_PIXELS.value,
            overwrite=_OVERWRITE.value,
            show_progress=True,
            num_workers=_NUM_WORKERS.value,
            **_source_options(_SOURCE.value),
        )
    except builder.BuildError as error:
        print(error.report.format_text(max_listed=50), file=sys.stderr)
        logging.error("Build failed: %s", error)
        sys.exit(1)
    except (
        importers.DuplicateIdError,
        FileExistsError,
        FileNotFoundError,
        pickle.UnpicklingError,
        ValueError,
    ) as error:
        logging.error("Build failed: %s", error)
        sys.exit(1)
    print(report.format_text(max_listed=50))


if __name__ == "__main__":
    app.run(main)
