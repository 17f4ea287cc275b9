"""grain input pipeline: fixed-shape batches of CLIP-ready posts from a TFDS split.

Each batch is a dict of numpy arrays, for a per-process batch of B posts and
images of S x S pixels:

  text/input_ids, text/attention_mask                      int32 (B, 77)
  attributes/input_ids, attributes/attention_mask          int32 (B, 77)
  pseudo_attributes/input_ids, pseudo_attributes/attention_mask
                                                           int32 (B, 77)
  image, pseudo_image                                      float32 (B, S, S, 3)
  has_pseudo                                               bool (B,)
  label                                                    int32 (B,) 0 negative,
                                                           1 neutral, 2 positive
  valid                                                    bool (B,)

A post without pseudo data gets an all-zero `pseudo_image`, the tokens of an
empty `pseudo_attributes` string and `has_pseudo` False. The model masks such
rows (F_P' = 0), so the zeros never stand in for data.

Batches are the unit of work: element k of the grain data source is the whole
batch k, read from TFDS, decoded, CLIP-preprocessed and tokenized. grain's
read threads (`read_threads`) build the next batches while the caller trains
on the current one, and `worker_count` > 0 moves that work into worker
processes. Because every batch is one element, the order of posts does not
depend on the number of threads or workers.

Training (`make_train_loader`): epoch e visits the split in the order of a
permutation drawn from (seed, e), so the order is reproducible and changes
every epoch. An epoch has floor(num_posts / global_batch_size) steps. The
posts after the last full batch are left out of that epoch, and each epoch
leaves out a different remainder. Every process computes the same global batch and
takes its own contiguous slice, by `jax.process_index()`. The loader's
iterator has grain's `get_state()` / `set_state()` for exact resumption.

Evaluation (`make_eval_loader`): every post exactly once, in stored order. The
last global batch is padded; padding rows have `valid` False, label 0, zero
images and empty-string tokens.
"""

import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import grain
import numpy as np
from absl import flags, logging

from fashion_msa.clip.image_processing import DEFAULT_MAX_PIXELS, preprocess_image

TEXT_FIELDS = {
    "text": ("text",),
    "attributes": ("attributes",),
    "pseudo_attributes": ("pseudo", "attributes"),
}


class Tokenizer(Protocol):
    """Tokenizer interface the pipeline calls, as `CLIPTextTokenizer` provides it."""

    max_length: int

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]: ...


class RecordSource(Protocol):
    """A random-access split, such as `builder.load_split(...)` returns."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def _as_str(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _field(record: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        record = record[key]
    return record


@dataclasses.dataclass(frozen=True)
class BatchPreprocessor:
    """Turns TFDS records (None for a padding row) into one batch dict.

    Attributes:
      image_size: side S of the CLIP input images.
      tokenizer: a CLIP tokenizer returning `max_length` columns (77).
      max_pixels: largest decoded or resized image accepted.
    """

    image_size: int
    tokenizer: Tokenizer
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __call__(
        self, records: Sequence[dict[str, Any] | None]
    ) -> dict[str, np.ndarray]:
        size = len(records)
        valid = np.array([record is not None for record in records], dtype=bool)
        batch: dict[str, np.ndarray] = {}

        for name, path in TEXT_FIELDS.items():
            texts = [
                "" if record is None else _as_str(_field(record, path))
                for record in records
            ]
            tokens = self.tokenizer(texts)
            batch[f"{name}/input_ids"] = np.asarray(tokens["input_ids"], np.int32)
            batch[f"{name}/attention_mask"] = np.asarray(
                tokens["attention_mask"], np.int32
            )

        shape = (size, self.image_size, self.image_size, 3)
        batch["image"] = np.zeros(shape, np.float32)
        batch["pseudo_image"] = np.zeros(shape, np.float32)
        batch["has_pseudo"] = np.zeros(size, bool)
        batch["label"] = np.zeros(size, np.int32)
        for row, record in enumerate(records):
            if record is None:
                continue
            batch["image"][row] = self._preprocess(record["image"])
            if record["has_pseudo"]:
                batch["pseudo_image"][row] = self._preprocess(record["pseudo"]["image"])
                batch["has_pseudo"][row] = True
            batch["label"][row] = record["label"]
        batch["valid"] = valid
        return batch

    def _preprocess(self, data: bytes) -> np.ndarray:
        return preprocess_image(data, self.image_size, max_pixels=self.max_pixels)


def read_records(source: RecordSource, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Read the records at `indices`, in one call when the source supports it."""
    indices = [int(index) for index in indices]
    if hasattr(source, "__getitems__"):
        return list(source.__getitems__(indices))
    return [source[index] for index in indices]


class TrainBatches:
    """grain data source whose element k is training step k's batch for this process."""

    def __init__(
        self,
        source: RecordSource,
        preprocessor: BatchPreprocessor,
        *,
        global_batch_size: int,
        seed: int,
        num_epochs: int | None,
        process_index: int,
        process_count: int,
    ):
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by the "
                f"{process_count} processes"
            )
        self._source = source
        self._preprocessor = preprocessor
        self._num_records = len(source)
        self._global_batch_size = global_batch_size
        self._batch_size = global_batch_size // process_count
        self._seed = seed
        self._num_epochs = num_epochs
        self._process_index = process_index
        self._process_count = process_count
        self.steps_per_epoch = self._num_records // global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the split has {self._num_records} posts, fewer than one batch of "
                f"{global_batch_size}"
            )
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        if self._num_epochs is None:
            return sys.maxsize
        return self.steps_per_epoch * self._num_epochs

    def __repr__(self) -> str:
        # grain compares this text with a saved iterator state before resuming.
        return (
            f"TrainBatches(source={self._source!r}, num_records={self._num_records}, "
            f"global_batch_size={self._global_batch_size}, seed={self._seed}, "
            f"num_epochs={self._num_epochs}, process={self._process_index}/"
            f"{self._process_count}, image_size={self._preprocessor.image_size})"
        )

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of the split's records in `epoch`, the same on every process."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self._seed, epoch])
            self._permutations[epoch] = rng.permutation(self._num_records)
        return self._permutations[epoch]

    def record_indices(self, step: int) -> np.ndarray:
        """Record indices of this process's rows of global step `step`."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        start = (
            step_in_epoch * self._global_batch_size
            + self._process_index * self._batch_size
        )
        return self.permutation(epoch)[start : start + self._batch_size]

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        return self._preprocessor(read_records(self._source, self.record_indices(step)))


class EvalBatches:
    """grain data source whose element k is evaluation batch k for this process."""

    def __init__(
        self,
        source: RecordSource,
        preprocessor: BatchPreprocessor,
        *,
        global_batch_size: int,
        process_index: int,
        process_count: int,
    ):
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by the "
                f"{process_count} processes"
            )
        self._source = source
        self._preprocessor = preprocessor
        self._num_records = len(source)
        self._global_batch_size = global_batch_size
        self._batch_size = global_batch_size // process_count
        self._process_index = process_index
        self._process_count = process_count

    def __len__(self) -> int:
        return math.ceil(self._num_records / self._global_batch_size)

    def __repr__(self) -> str:
        return (
            f"EvalBatches(source={self._source!r}, num_records={self._num_records}, "
            f"global_batch_size={self._global_batch_size}, process="
            f"{self._process_index}/{self._process_count}, "
            f"image_size={self._preprocessor.image_size})"
        )

    def record_indices(self, index: int) -> np.ndarray:
        """Record indices of this process's rows of batch `index`; -1 marks padding."""
        start = index * self._global_batch_size + self._process_index * self._batch_size
        positions = np.arange(start, start + self._batch_size)
        return np.where(positions < self._num_records, positions, -1)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        indices = self.record_indices(index)
        real = read_records(self._source, indices[indices >= 0])
        return self._preprocessor(real + [None] * int(np.sum(indices < 0)))


def _process_layout(
    process_index: int | None, process_count: int | None
) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index {process_index} is outside 0..{process_count - 1}"
        )
    return process_index, process_count


def data_loader(
    batches: TrainBatches | EvalBatches,
    *,
    worker_count: int = 0,
    read_threads: int = 2,
    prefetch_batches: int = 2,
) -> grain.DataLoader:
    """Wrap a batch source in a grain DataLoader that yields its elements in order."""
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        # grain's worker processes read grain's absl flags, which raises
        # outside absl.app.run (in a notebook or under pytest) unless the flags
        # count as parsed. Their defaults are what such a caller gets.
        logging.info("Marking absl flags as parsed so grain workers can start.")
        flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(
        data_source=batches,
        sampler=grain.samplers.SequentialSampler(
            num_records=len(batches), shard_options=grain.sharding.NoSharding()
        ),
        worker_count=worker_count,
        worker_buffer_size=prefetch_batches,
        shard_options=grain.sharding.NoSharding(),
        read_options=grain.ReadOptions(
            num_threads=read_threads, prefetch_buffer_size=prefetch_batches
        ),
    )


def make_train_loader(
    source: RecordSource,
    *,
    global_batch_size: int,
    image_size: int,
    tokenizer: Tokenizer,
    seed: int,
    num_epochs: int | None = None,
    worker_count: int = 0,
    read_threads: int = 2,
    prefetch_batches: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> grain.DataLoader:
    """Return a grain DataLoader of shuffled training batches.

    Args:
      source: the training split, e.g. `builder.load_split(data_dir, src, "train")`.
      global_batch_size: posts per step over all processes; each process gets
        global_batch_size / process_count rows.
      image_size: side of the CLIP input images (config.vision.image_size).
      tokenizer: from `fashion_msa.clip.tokenizer.load_tokenizer`.
      seed: shuffling seed; the same seed gives the same batches.
      num_epochs: epochs to yield; None repeats forever.
      worker_count: worker processes; 0 builds batches in this process's read
        threads.
      read_threads: threads per process (or worker) building batches.
      prefetch_batches: batches buffered ahead per thread pool and per worker.
      process_index, process_count: default to jax.process_index() and
        jax.process_count().
      max_pixels: largest image accepted while decoding.

    Returns:
      A DataLoader; `iter(loader)` gives an iterator with get_state/set_state.
      An epoch is `train_steps_per_epoch(len(source), global_batch_size)`
      steps.
    """
    process_index, process_count = _process_layout(process_index, process_count)
    batches = TrainBatches(
        source,
        BatchPreprocessor(image_size, tokenizer, max_pixels),
        global_batch_size=global_batch_size,
        seed=seed,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
    )
    return data_loader(
        batches,
        worker_count=worker_count,
        read_threads=read_threads,
        prefetch_batches=prefetch_batches,
    )


def make_eval_loader(
    source: RecordSource,
    *,
    global_batch_size: int,
    image_size: int,
    tokenizer: Tokenizer,
    worker_count: int = 0,
    read_threads: int = 2,
    prefetch_batches: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> grain.DataLoader:
    """Return a grain DataLoader that yields every post once, padding the last batch.

    Arguments are those of `make_train_loader` without shuffling. Every
    process yields `eval_num_batches(len(source), global_batch_size)` batches.
    """
    process_index, process_count = _process_layout(process_index, process_count)
    batches = EvalBatches(
        source,
        BatchPreprocessor(image_size, tokenizer, max_pixels),
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    return data_loader(
        batches,
        worker_count=worker_count,
        read_threads=read_threads,
        prefetch_batches=prefetch_batches,
    )


def train_steps_per_epoch(num_records: int, global_batch_size: int) -> int:
    """Steps in one training epoch: full global batches only."""
    return num_records // global_batch_size


def eval_num_batches(num_records: int, global_batch_size: int) -> int:
    """Batches of one evaluation pass, the last one padded."""
    return math.ceil(num_records / global_batch_size)
