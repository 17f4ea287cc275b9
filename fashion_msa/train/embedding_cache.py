"""Frozen-tower fast path: CLIP embeddings of every post, computed once and cached.

With `config.train.freeze_towers`, the CLIP towers never change during a run,
so their outputs for a post never change either. The trainer encodes every
post of the splits it uses once (`FashionMSA.encode`: text, attributes, pseudo
attributes, image and pseudo image), and trains only the fusion networks, the
adapter and the classifier on those embeddings. A step then costs a few small
matrix products instead of two transformer passes, which is what makes
learning-rate sweeps take minutes.

The tables live in `config.train.embedding_cache_dir` (by default
WORKDIR/embedding_cache) as one `.npz` file per split and key, next to a JSON
file with the key's parts. The key covers everything the embeddings depend on:

  the tower parameters (a digest of every array, so a checkpoint or an
  initialisation seed), the CLIP config, the tower compute dtype, the
  tokenizer, the encoded modalities, and the split's decoded records.

A run whose key matches an existing file loads it; anything else computes the
table and adds a file. Runs of a sweep can therefore share one cache folder,
and runs with different towers or data never read each other's tables.

Batches of the cached path come from the same grain batch sources as the
image path (`TrainBatches`, `EvalBatches`). A frozen run therefore visits the
posts in the same order as a run whose tower learning rate is zero, and draws
the same dropout masks.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from tqdm import tqdm

from fashion_msa.clip.tokenizer import CLIPTextTokenizer
from fashion_msa.data import pipeline
from fashion_msa.model.msa import TOWER_MODULE, FashionMSA
from fashion_msa.train import padding, sharding

CACHE_DIR = "embedding_cache"
# Bump when the cached arrays change meaning, so that old files stop matching.
FORMAT_VERSION = 1
ROW_KEYS = ("label", "has_pseudo")


def tree_digest(tree: Any) -> str:
    """Return the SHA-256 over every leaf's path, dtype, shape and bytes."""
    digest = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        array = np.asarray(jax.device_get(leaf))
        header = f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|"
        digest.update(header.encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _hash_value(digest: Any, value: Any) -> None:
    """Feed one decoded record field into `digest`, tagged by type and length."""
    if isinstance(value, Mapping):
        digest.update(b"{%d" % len(value))
        for key in sorted(value):
            digest.update(key.encode() + b"\0")
            _hash_value(digest, value[key])
    elif isinstance(value, str):
        data = value.encode()
        digest.update(b"s%d:" % len(data) + data)
    elif isinstance(value, bytes | bytearray):
        digest.update(b"b%d:" % len(value) + bytes(value))
    else:
        array = np.asarray(value)
        if array.dtype == object:
            digest.update(b"o%d:" % array.size)
            for item in array.ravel():
                _hash_value(digest, item)
        else:
            digest.update(f"a{array.dtype.str}{array.shape}:".encode())
            digest.update(np.ascontiguousarray(array).tobytes())


def records_digest(split_source: pipeline.RecordSource, chunk_size: int = 256) -> str:
    """Return the SHA-256 over every decoded record of a split, in stored order.

    It reads the decoded fields, not the files, because two builds of the same
    posts store equal records in array_record files that differ in some bytes.
    """
    digest = hashlib.sha256()
    size = len(split_source)
    digest.update(b"n%d" % size)
    for start in range(0, size, chunk_size):
        indices = range(start, min(start + chunk_size, size))
        for record in pipeline.read_records(split_source, indices):
            _hash_value(digest, record)
    return digest.hexdigest()


def tokenizer_digest(tokenizer: CLIPTextTokenizer) -> str:
    """Return the SHA-256 of the tokenizer's vocabulary, merges, rules and length.

    The backend's truncation and padding settings are left out: transformers
    changes them on the first call, and `CLIPTextTokenizer` sets its own.
    """
    backend = json.loads(tokenizer.tokenizer.backend_tokenizer.to_str())
    backend.pop("truncation", None)
    backend.pop("padding", None)
    backend["max_length"] = tokenizer.max_length
    backend["pad_token_id"] = tokenizer.pad_token_id
    text = json.dumps(backend, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class CacheKey:
    """The inputs of one split's embeddings; `digest` names the cache file.

    Attributes:
      towers: `tree_digest` of the tower parameters.
      clip_config: the towers' config as a Hugging Face dict.
      dtype: tower compute dtype.
      tokenizer: `tokenizer_digest` of the tokenizer.
      embedding_keys: the cached tower outputs (`FashionMSA.embedding_keys`).
      split: the split's name.
      records: `records_digest` of the split.
    """

    towers: str
    clip_config: Mapping[str, Any]
    dtype: str
    tokenizer: str
    embedding_keys: tuple[str, ...]
    split: str
    records: str

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["embedding_keys"] = list(self.embedding_keys)
        values["format_version"] = FORMAT_VERSION
        return values

    @property
    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def file_name(self) -> str:
        return f"{self.split}-{self.digest[:20]}.npz"


def cache_key(
    model: FashionMSA,
    tower_params: Any,
    tokenizer: CLIPTextTokenizer,
    split_source: pipeline.RecordSource,
    split: str,
    *,
    towers_digest: str | None = None,
) -> CacheKey:
    """Build the key of one split's embeddings.

    `towers_digest` may pass a `tree_digest(tower_params)` computed earlier,
    since hashing ViT-B/32 weights reads about 600 MB.
    """
    return CacheKey(
        towers=towers_digest or tree_digest(tower_params),
        clip_config=model.clip_config.to_hf_dict(),
        dtype=jnp.dtype(model.dtype).name,
        tokenizer=tokenizer_digest(tokenizer),
        embedding_keys=model.embedding_keys,
        split=split,
        records=records_digest(split_source),
    )


@dataclasses.dataclass(frozen=True)
class EmbeddingTable:
    """Tower outputs of every post of a split, in stored order.

    A random-access record source for `pipeline.TrainBatches` and
    `pipeline.EvalBatches`: record i is a dict of row i of every array.

    Attributes:
      arrays: the embedding keys, float32 (num_posts, d) each, plus "label"
        int32 (num_posts,) and "has_pseudo" bool (num_posts,).
    """

    arrays: Mapping[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.arrays["label"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.arrays.items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        return [self[i] for i in indices]

    def __repr__(self) -> str:
        # grain compares this text with a saved iterator state before resuming.
        return f"EmbeddingTable(num_posts={len(self)}, keys={sorted(self.arrays)})"

    def save(self, path: pathlib.Path) -> None:
        """Write the arrays to `path` (.npz) atomically."""
        # A name of its own, so that runs sharing the folder never mix writes.
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        with open(partial, "wb") as f:
            np.savez(f, **self.arrays)
        partial.replace(path)

    @classmethod
    def load(cls, path: pathlib.Path) -> "EmbeddingTable":
        with np.load(path) as data:
            return cls({k: data[k] for k in data.files})


@dataclasses.dataclass(frozen=True)
class EmbeddingBatcher:
    """Stacks `EmbeddingTable` records (None for a padding row) into a batch dict.

    The batch has the embedding keys, "label", "has_pseudo" and "valid", which
    is what `FashionMSA` and the train and eval steps read. Padding rows are
    zeros with `valid` False.

    Attributes:
      embedding_keys: the tower outputs to stack.
      embedding_dim: width d of every embedding.
      image_size: side of the images the embeddings were computed from (shown
        in the batch source's description).
    """

    embedding_keys: tuple[str, ...]
    embedding_dim: int
    image_size: int

    def __call__(
        self, records: Sequence[Mapping[str, np.ndarray] | None]
    ) -> dict[str, np.ndarray]:
        size = len(records)
        batch = {
            k: np.zeros((size, self.embedding_dim), np.float32)
            for k in self.embedding_keys
        }
        batch["label"] = np.zeros(size, np.int32)
        batch["has_pseudo"] = np.zeros(size, bool)
        batch["valid"] = np.array([r is not None for r in records], dtype=bool)
        for row, record in enumerate(records):
            if record is None:
                continue
            for key in (*self.embedding_keys, *ROW_KEYS):
                batch[key][row] = record[key]
        return batch


def jit_encode(model: FashionMSA, mesh: Mesh) -> Any:
    """Jit `(tower_params, batch) -> tower outputs` on the mesh.

    The outputs are the embedding keys plus the batch's "label", "has_pseudo"
    and "valid", replicated so that every process receives every row.
    """
    replicated = sharding.replicated_sharding(mesh)

    def encode(params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        outputs = model.apply(
            {"params": {TOWER_MODULE: params}}, batch, method=FashionMSA.encode
        )
        outputs.update({k: batch[k] for k in (*ROW_KEYS, "valid")})
        return outputs

    return jax.jit(
        encode,
        in_shardings=(replicated, sharding.batch_sharding(mesh)),
        out_shardings=replicated,
    )


def compute_embeddings(
    model: FashionMSA,
    tower_params: Any,
    split_source: pipeline.RecordSource,
    *,
    tokenizer: CLIPTextTokenizer,
    batch_size: int,
    mesh: Mesh,
    text_length_buckets: Sequence[int] = (),
    num_workers: int = 0,
    description: str = "embed",
    show_progress: bool = False,
) -> EmbeddingTable:
    """Encode every post of a split with the towers (dropout off, no gradients).

    Args:
      model: the model whose `encode` runs.
      tower_params: the "clip" parameter collection.
      split_source: a split from `builder.load_split`.
      tokenizer: the run's tokenizer.
      batch_size: global batch of the encoding pass.
      mesh: the data-parallel mesh; every process receives every row.
      text_length_buckets: trim text padding to these lengths (exact).
      num_workers: grain worker processes decoding the images.
      description, show_progress: the tqdm bar.
    """
    loader = pipeline.make_eval_loader(
        split_source,
        global_batch_size=batch_size,
        image_size=model.clip_config.vision.image_size,
        tokenizer=tokenizer,
        worker_count=num_workers,
    )
    encode = jit_encode(model, mesh)
    chunks = []
    num_batches = pipeline.eval_num_batches(len(split_source), batch_size)
    for batch in tqdm(
        loader,
        desc=description,
        unit="batch",
        total=num_batches,
        leave=False,
        disable=not show_progress,
    ):
        if text_length_buckets:
            batch = padding.trim_batch_text(batch, text_length_buckets)
        chunks.append(encode(tower_params, sharding.shard_batch(batch, mesh)))
    chunks = jax.device_get(chunks)
    valid = np.concatenate([c["valid"] for c in chunks])
    arrays = {
        k: np.concatenate([c[k] for c in chunks])[valid]
        for k in (*model.embedding_keys, *ROW_KEYS)
    }
    arrays["label"] = arrays["label"].astype(np.int32)
    arrays["has_pseudo"] = arrays["has_pseudo"].astype(bool)
    if len(arrays["label"]) != len(split_source):
        raise RuntimeError(
            f"{description}: encoded {len(arrays['label'])} posts, but the split "
            f"has {len(split_source)}"
        )
    return EmbeddingTable(arrays)


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """A split's embeddings and where they came from.

    Attributes:
      table: the embeddings.
      path: the cache file.
      hit: True when the file existed; False when this run computed it.
      seconds: time to load or to compute and write the table.
    """

    table: EmbeddingTable
    path: pathlib.Path
    hit: bool
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "hit": self.hit,
            "seconds": self.seconds,
            "num_posts": len(self.table),
        }


def load_or_compute(
    cache_dir: pathlib.Path,
    key: CacheKey,
    compute: Any,
    *,
    write: bool = True,
) -> CacheEntry:
    """Load the table named by `key` from `cache_dir`, or call `compute()` and save it.

    `write` False (processes other than 0) computes without writing.
    """
    start = time.perf_counter()
    path = cache_dir / key.file_name
    if path.is_file():
        table = EmbeddingTable.load(path)
        logging.info(
            "Loaded the %s embeddings of %d posts from %s", key.split, len(table), path
        )
        return CacheEntry(table, path, True, time.perf_counter() - start)

    logging.info("No cached %s embeddings for this key; encoding the split", key.split)
    table = compute()
    if write:
        cache_dir.mkdir(parents=True, exist_ok=True)
        table.save(path)
        path.with_suffix(".json").write_text(
            json.dumps(key.to_dict(), indent=2, sort_keys=True) + "\n"
        )
    seconds = time.perf_counter() - start
    logging.info(
        "Encoded the %s split (%d posts) in %.1f s; cached at %s",
        key.split,
        len(table),
        seconds,
        path,
    )
    return CacheEntry(table, path, False, seconds)


def batcher(model: FashionMSA) -> EmbeddingBatcher:
    """Return the batcher of the model's cached tower outputs."""
    return EmbeddingBatcher(
        model.embedding_keys,
        model.clip_config.projection_dim,
        model.clip_config.vision.image_size,
    )


def train_loader(
    table: EmbeddingTable,
    model: FashionMSA,
    *,
    batch_size: int,
    seed: int,
    num_epochs: int,
) -> grain.DataLoader:
    """Return shuffled batches of cached embeddings, in the image path's order."""
    process_index, process_count = jax.process_index(), jax.process_count()
    batches = pipeline.TrainBatches(
        table,
        batcher(model),
        global_batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
    )
    return pipeline.data_loader(batches, worker_count=0)


def eval_loader(
    table: EmbeddingTable, model: FashionMSA, *, batch_size: int
) -> grain.DataLoader:
    """Return every post's cached embeddings once, padding the last batch."""
    batches = pipeline.EvalBatches(
        table,
        batcher(model),
        global_batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return pipeline.data_loader(batches, worker_count=0)
