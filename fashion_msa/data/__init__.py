"""Fashion-post data: importers, a TFDS builder with pseudo data, a grain pipeline.

Modules:
  importers   `load_posts(source, input_dir)` for manifest, fashion_senti,
              mvsa_single and synthetic; the records in `posts`.
  builder     `FashionPosts` (TFDS, array_record), `build_dataset`, `load_split`.
  pipeline    `make_train_loader`, `make_eval_loader`: batches for the model.
  synthetic   procedurally drawn posts with pseudo data, for demos and tests.

Only the light post records are imported here; `builder` (TFDS) and `pipeline`
(grain) load on first import of those modules.
"""

from fashion_msa.data.posts import LABELS, SPLITS, ImportResult, Post, Skip, SkipReason

__all__ = ["LABELS", "SPLITS", "ImportResult", "Post", "Skip", "SkipReason"]
