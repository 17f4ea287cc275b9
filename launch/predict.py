r"""Classify new posts with a training run's best checkpoint.

  python -m launch.predict --workdir=/tmp/fashion_msa_demo \
      --input=posts.jsonl --output=predictions.jsonl

Each input line is a JSON object: `text` and `image` (a path, relative to the
input file's folder unless absolute) are required; `id`, `attributes` (string
or {name: value}), and pseudo data `pseudo_image`, `pseudo_attributes`,
`pseudo_description` are optional. Each output line has the `id`, the `label`,
the class `probabilities`, `has_pseudo` and `mean_sim` (the adapter's mean
similarity between the post and its pseudo data). Lines that cannot be used
are reported and written to the output with an `error` instead of a label;
the exit status is then 1.
"""

import sys

from absl import app, flags, logging

from fashion_msa.train import checkpointing, inference

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a launch.train run.")
_INPUT = flags.DEFINE_string("input", None, "JSONL file of posts to classify.")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL file to write predictions to.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Posts per step; default: the run's eval_batch_size."
)
flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    checkpointing.quiet_orbax_logging()
    trained = inference.load_trained(_WORKDIR.value)
    posts, errors = inference.read_posts(_INPUT.value, trained.image_size)
    predictions = inference.predict_posts(trained, posts, batch_size=_BATCH_SIZE.value)

    by_line = {
        post.line: record for post, record in zip(posts, predictions, strict=True)
    }
    by_line.update({error["line"]: error for error in errors})
    inference.write_jsonl(_OUTPUT.value, [by_line[line] for line in sorted(by_line)])
    for error in errors:
        logging.error(
            "Skipped %s line %d: %s", _INPUT.value, error["line"], error["error"]
        )
    print(
        f"Predicted {len(predictions)} posts, skipped {len(errors)}; "
        f"written to {_OUTPUT.value}"
    )
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
