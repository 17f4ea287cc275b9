"""Use a trained workdir: restore the best checkpoint, evaluate splits, predict posts.

Everything is rebuilt from the workdir alone (config.json, clip_config.json,
best/), so a CLIP checkpoint directory used for training need not exist any
more. The tokenizer is read from that checkpoint when it still exists and from
OpenAI's vocabulary otherwise, which is the same vocabulary.
"""

import dataclasses
import json
import math
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from fashion_msa.clip.config import CLIPConfig
from fashion_msa.clip.image_processing import ImageDecodeError, preprocess_image
from fashion_msa.clip.tokenizer import CLIPTextTokenizer, load_tokenizer
from fashion_msa.data.posts import format_attributes
from fashion_msa.model import factory
from fashion_msa.model.msa import FashionMSA, init_params
from fashion_msa.train import checkpointing, run_data, sharding, steps, trainer
from fashion_msa.train.metrics import CLASS_NAMES


@dataclasses.dataclass
class TrainedModel:
    """A model restored from a workdir's best checkpoint.

    Attributes:
      config: the run's configuration.
      model: the Flax module.
      params: parameters of the best validation checkpoint, replicated on `mesh`.
      best_step: global step of that checkpoint.
      validation: what was recorded with it (split, epoch, metrics).
      mesh: the data-parallel mesh over every device.
      tokenizer: the CLIP tokenizer.
      workdir: the training workdir.
    """

    config: ml_collections.ConfigDict
    model: FashionMSA
    params: Any
    best_step: int
    validation: dict[str, Any]
    mesh: jax.sharding.Mesh
    tokenizer: CLIPTextTokenizer
    workdir: pathlib.Path

    @property
    def image_size(self) -> int:
        return self.model.clip_config.vision.image_size


def load_trained(workdir: str | pathlib.Path) -> TrainedModel:
    """Restore the best checkpoint of a training workdir.

    Raises:
      FileNotFoundError: the workdir has no config.json or no best checkpoint.
    """
    workdir = pathlib.Path(workdir).absolute()
    config_path = workdir / trainer.CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found; pass the --workdir of a launch.train run"
        )
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    clip_config = CLIPConfig.from_hf_dict(
        json.loads((workdir / trainer.CLIP_CONFIG_FILE).read_text())
    )
    model = factory.create_model(config.model, clip_config)
    mesh = sharding.create_mesh()
    replicated = sharding.replicated_sharding(mesh)
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
    )

    checkpoints = checkpointing.RunCheckpoints(workdir, read_only=True)
    try:
        best_step, params, validation = checkpoints.restore_best(abstract)
    finally:
        checkpoints.close()
    checkpoint_dir = config.model.clip.checkpoint
    tokenizer = load_tokenizer(
        checkpoint_dir
        if checkpoint_dir and pathlib.Path(checkpoint_dir).is_dir()
        else None
    )
    logging.info(
        "Restored the best checkpoint of %s (global step %d)", workdir, best_step
    )
    return TrainedModel(
        config, model, params, best_step, validation, mesh, tokenizer, workdir
    )


def evaluate_split(
    trained: TrainedModel,
    split: str,
    data_dir: str | pathlib.Path | None = None,
    source: str | None = None,
    batch_size: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the restored model on a split of a built dataset.

    Args:
      trained: from `load_trained`.
      split: split name (train, val, test).
      data_dir: TFDS data directory; default: the training run's.
      source: dataset source in `data_dir`; default: the training run's.
      batch_size: global evaluation batch; default: config.train.eval_batch_size.
      show_progress: show a progress bar.
    """
    config = trained.config
    source = source or config.data.source
    if data_dir is None:
        data_dir = run_data.resolve_data_dir(config.data, trained.workdir)
    batch_size = batch_size or config.train.eval_batch_size
    sharding.check_batch_size(batch_size, trained.mesh)
    split_source = run_data.open_split(pathlib.Path(data_dir), source, split)
    loader = run_data.eval_loader(
        split_source,
        batch_size=batch_size,
        image_size=trained.image_size,
        tokenizer=trained.tokenizer,
        num_workers=config.data.num_workers,
    )
    eval_step = steps.jit_eval_step(steps.eval_step, trained.mesh, model=trained.model)
    return trainer.evaluate_loader(
        eval_step,
        trained.params,
        loader,
        trained.mesh,
        description=f"eval {split}",
        show_progress=show_progress,
        has_adapter=trained.model.config.has_adapter,
        num_batches=math.ceil(len(split_source) / batch_size),
    )


# Prediction on raw posts.


class PostInputError(ValueError):
    """A post of the prediction input is unusable; the message names the line."""


@dataclasses.dataclass
class RawPost:
    """One prediction input, read from a JSONL line."""

    line: int
    id: str
    text: str
    image: np.ndarray
    attributes: str
    pseudo_attributes: str
    pseudo_image: np.ndarray | None


def _read_image(
    value: Any, base: pathlib.Path, image_size: int, what: str
) -> np.ndarray:
    if not isinstance(value, str) or not value:
        raise PostInputError(f"{what} must be a non-empty path string, got {value!r}")
    path = pathlib.Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise PostInputError(f"{what} file not found: {path}")
    try:
        return preprocess_image(path.read_bytes(), image_size)
    except ImageDecodeError as e:
        raise PostInputError(f"{what} {path} failed to decode: {e}") from e


def parse_post(record: Any, line: int, base: pathlib.Path, image_size: int) -> RawPost:
    """Check and preprocess one prediction input.

    Required keys: `text`, and `image`, a path that is relative to the input
    file's folder unless absolute. Optional keys: `id`, `attributes` (a string
    or a {name: value} object), and the pseudo data `pseudo_attributes`,
    `pseudo_image` and `pseudo_description`. A post has pseudo data when it has
    a `pseudo_image`. The model does not read `pseudo_description`.

    Raises:
      PostInputError: naming the line and the field.
    """
    try:
        if not isinstance(record, dict):
            raise PostInputError("the line is not a JSON object")
        text = record.get("text")
        if not isinstance(text, str):
            raise PostInputError(f"text must be a string, got {text!r}")
        image = _read_image(record.get("image"), base, image_size, "image")
        pseudo_image = None
        if record.get("pseudo_image") is not None:
            pseudo_image = _read_image(
                record["pseudo_image"], base, image_size, "pseudo_image"
            )
        try:
            attributes = format_attributes(record.get("attributes"))
            pseudo_attributes = format_attributes(record.get("pseudo_attributes"))
        except ValueError as e:
            raise PostInputError(str(e)) from e
    except PostInputError as e:
        raise PostInputError(f"line {line}: {e}") from None
    return RawPost(
        line=line,
        id=str(record.get("id", line)),
        text=text,
        image=image,
        attributes=attributes,
        pseudo_attributes=pseudo_attributes,
        pseudo_image=pseudo_image,
    )


def read_posts(
    path: str | pathlib.Path, image_size: int
) -> tuple[list[RawPost], list[dict[str, Any]]]:
    """Read a JSONL file of posts, returning (usable posts, errors with line and id)."""
    path = pathlib.Path(path)
    posts, errors = [], []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(
                    {"line": line_number, "id": None, "error": f"invalid JSON: {e}"}
                )
                continue
            try:
                posts.append(parse_post(record, line_number, path.parent, image_size))
            except PostInputError as e:
                post_id = record.get("id") if isinstance(record, dict) else None
                errors.append({"line": line_number, "id": post_id, "error": str(e)})
    return posts, errors


def make_batch(
    posts: Sequence[RawPost],
    tokenizer: CLIPTextTokenizer,
    batch_size: int,
    image_size: int,
) -> dict[str, np.ndarray]:
    """Build a model batch from up to `batch_size` posts, padding with invalid rows."""
    pad = batch_size - len(posts)
    texts = {
        "text": [p.text for p in posts] + [""] * pad,
        "attributes": [p.attributes for p in posts] + [""] * pad,
        "pseudo_attributes": [p.pseudo_attributes for p in posts] + [""] * pad,
    }
    batch: dict[str, np.ndarray] = {}
    for name, values in texts.items():
        tokens = tokenizer(values)
        batch[f"{name}/input_ids"] = np.asarray(tokens["input_ids"], np.int32)
        batch[f"{name}/attention_mask"] = np.asarray(tokens["attention_mask"], np.int32)
    shape = (batch_size, image_size, image_size, 3)
    batch["image"] = np.zeros(shape, np.float32)
    batch["pseudo_image"] = np.zeros(shape, np.float32)
    batch["has_pseudo"] = np.zeros(batch_size, bool)
    for row, post in enumerate(posts):
        batch["image"][row] = post.image
        if post.pseudo_image is not None:
            batch["pseudo_image"][row] = post.pseudo_image
            batch["has_pseudo"][row] = True
    batch["label"] = np.zeros(batch_size, np.int32)
    batch["valid"] = np.arange(batch_size) < len(posts)
    return batch


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_posts(
    trained: TrainedModel, posts: Sequence[RawPost], batch_size: int | None = None
) -> list[dict[str, Any]]:
    """Classify posts, returning one record per post.

    Each record has `id`, `label`, `probabilities` ({class: p}), `has_pseudo`
    and `mean_sim` (the mean of the adapter's Sim over its d dimensions; None
    for a model without adapter or a post without pseudo data, whose pseudo
    branch the model zeroes).
    """
    num_devices = trained.mesh.devices.size
    batch_size = batch_size or trained.config.train.eval_batch_size
    batch_size = max(num_devices, math.ceil(batch_size / num_devices) * num_devices)
    predict = steps.jit_eval_step(steps.predict_step, trained.mesh, model=trained.model)
    has_adapter = trained.model.config.has_adapter

    results = []
    for chunk in _chunks(posts, batch_size):
        batch = make_batch(chunk, trained.tokenizer, batch_size, trained.image_size)
        out = jax.device_get(
            predict(trained.params, sharding.shard_batch(batch, trained.mesh))
        )
        for row, post in enumerate(chunk):
            probabilities = np.asarray(out["probabilities"][row], np.float64)
            has_pseudo = post.pseudo_image is not None
            mean_sim = (
                float(out["mean_sim"][row]) if has_adapter and has_pseudo else None
            )
            results.append(
                {
                    "id": post.id,
                    "label": CLASS_NAMES[int(probabilities.argmax())],
                    "probabilities": {
                        name: float(p)
                        for name, p in zip(CLASS_NAMES, probabilities, strict=True)
                    },
                    "has_pseudo": has_pseudo,
                    "mean_sim": mean_sim,
                }
            )
    return results


def write_jsonl(path: str | pathlib.Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Write records as JSON Lines."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
