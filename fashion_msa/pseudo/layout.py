"""File names of a pseudo-data folder, the contract with the dataset builder.

  descriptions.jsonl  one record a line, appended: {"id", "status": "ok" | "failed",
                      "image_description", "attributes": {name: value},
                      "prompt_hash", "model", "reason" (failures), "usage", ...}.
                      The builder takes the last "ok" record of an id.
  images/{id}.png     the pseudo image of a post.
  images.jsonl        one record per image attempt: id, status, seed, model,
                      prompt, steps, and "reason" for failures.
  batch/              Batch API request files and batches.jsonl (describe only).

A post has pseudo data when it has an "ok" description and an image file.
"""

DESCRIPTIONS_FILE = "descriptions.jsonl"
IMAGES_DIR = "images"
IMAGES_LOG = "images.jsonl"
BATCH_DIR = "batch"
