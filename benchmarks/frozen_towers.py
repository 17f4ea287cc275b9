r"""Fine-tuning epoch time with frozen, cached CLIP towers against trainable towers.

Three measurements in one process, at a CLIP preset's shapes with random
weights and the heads of configs/paper.py:

  trainable   the fine-tuning step of `fashion_msa.train.steps` on random
              batches of the input pipeline's shapes, text trimmed to length
              buckets (the fastest trainable path). The epoch time is the
              median step time times the steps of an epoch: a ViT-B/32 epoch
              of the MVSA training split takes about half an hour on 2 cores,
              too long to time in full.
  encoding    the one-off cost of `config.train.freeze_towers`: the jitted
              tower pass of `embedding_cache.compute_embeddings` (both towers,
              all five inputs of a post), in posts per second and as the
              estimated time to encode the training split.
  frozen      whole epochs as the trainer runs them with frozen towers: the
              grain loader over an `EmbeddingTable` of `--num_posts` posts,
              `shard_batch`, and the jitted fine-tuning step on the head
              parameters, timed from the first batch to the last step's end.

The speed-up per epoch is trainable epoch time over frozen epoch time. The
speed-up of a run of E epochs counts the encoding once:
E * trainable / (encoding + E * frozen).

Run from the repository root:

  python -m benchmarks.frozen_towers --preset=vit-b-32 --batch_size=16 \
      --output=/tmp/frozen_towers.json
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from benchmarks import batches as batch_lib
from benchmarks import common
from benchmarks import jax_steps as jax_steps_lib
from fashion_msa.clip.tokenizer import DEFAULT_LENGTH_BUCKETS
from fashion_msa.model.factory import create_model
from fashion_msa.model.msa import TOWER_MODULE, FashionMSA, init_params
from fashion_msa.train import embedding_cache, sharding, steps
from fashion_msa.train import optimizer as optimizer_lib

_PRESET = flags.DEFINE_enum("preset", "vit-b-32", ["tiny", "vit-b-32"], "CLIP shape.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Posts per training step.")
_NUM_POSTS = flags.DEFINE_integer(
    "num_posts", 2706, "Training posts per epoch (2706: the MVSA-Single train split)."
)
_TRAINABLE_STEPS = flags.DEFINE_integer(
    "trainable_steps", 3, "Timed fine-tuning steps with trainable towers."
)
_ENCODE_BATCHES = flags.DEFINE_integer(
    "encode_batches", 3, "Timed batches of the tower encoding pass."
)
_FROZEN_EPOCHS = flags.DEFINE_integer("frozen_epochs", 5, "Timed frozen epochs.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps (or epochs) first.")
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", True, "nn.scan over CLIP layers.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Tower compute dtype."
)
_LENGTH_BUCKETS = flags.DEFINE_list(
    "length_buckets",
    [str(b) for b in DEFAULT_LENGTH_BUCKETS],
    "Token lengths the text padding is trimmed to.",
)
_RUN_EPOCHS = flags.DEFINE_list(
    "run_epochs", ["1", "10"], "Run lengths E for the speed-up with encoding."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seeds weights and batches.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON file for the results; '' = none.")


def random_table(model: FashionMSA, num_posts: int, seed: int) -> Any:
    """Return an EmbeddingTable of unit-norm random embeddings and random labels."""
    rng = np.random.default_rng(seed)
    d = model.clip_config.projection_dim
    arrays = {}
    for key in model.embedding_keys:
        rows = rng.standard_normal((num_posts, d), dtype=np.float32)
        arrays[key] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    arrays["label"] = rng.integers(0, 3, num_posts).astype(np.int32)
    arrays["has_pseudo"] = rng.random(num_posts) < batch_lib.PSEUDO_FRACTION
    return embedding_cache.EmbeddingTable(arrays)


def time_trainable(
    model: FashionMSA, params: Any, mesh: Any, batch: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Compile and time the fine-tuning step with trainable towers."""
    runner = jax_steps_lib.JaxSteps("finetune", model, params, mesh, _SEED.value)
    device_batch = sharding.shard_batch(batch, mesh)
    compiled, lower_s, compile_s = runner.compile(device_batch)
    for _ in range(_WARMUP.value):
        runner.run(compiled, device_batch)
    times = [
        common.time_call(lambda: runner.run(compiled, device_batch))
        for _ in range(_TRAINABLE_STEPS.value)
    ]
    return {
        "compile_s": lower_s + compile_s,
        "step_time_s": common.summarize_times(times),
    }


def time_encoding(
    model: FashionMSA, params: Any, mesh: Any, batch: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Compile and time the tower pass that fills the embedding cache."""
    encode = embedding_cache.jit_encode(model, mesh)
    towers = params[TOWER_MODULE]
    device_batch = sharding.shard_batch(batch, mesh)
    start = time.perf_counter()
    compiled = encode.lower(towers, device_batch).compile()
    compile_s = time.perf_counter() - start
    for _ in range(_WARMUP.value):
        jax.block_until_ready(compiled(towers, device_batch))
    times = [
        common.time_call(lambda: jax.block_until_ready(compiled(towers, device_batch)))
        for _ in range(_ENCODE_BATCHES.value)
    ]
    summary = common.summarize_times(times)
    posts_per_s = len(batch["label"]) / summary["median"]
    return {
        "compile_s": compile_s,
        "batch_time_s": summary,
        "posts_per_s": posts_per_s,
        "train_split_s": _NUM_POSTS.value / posts_per_s,
    }


def time_frozen(model: FashionMSA, params: Any, mesh: Any) -> dict[str, Any]:
    """Time whole frozen epochs: loader, sharding and the heads-only step."""
    heads = {k: v for k, v in params.items() if k != TOWER_MODULE}
    table = random_table(model, _NUM_POSTS.value, _SEED.value)
    steps_per_epoch = _NUM_POSTS.value // _BATCH_SIZE.value
    epochs = _WARMUP.value + _FROZEN_EPOCHS.value
    tx, schedules = optimizer_lib.create_optimizer(
        optimizer_lib.OptimizerConfig(), heads, "finetune", epochs * steps_per_epoch
    )
    schedules = {"heads": schedules["heads"]}
    state = steps.create_train_state(model, jax.tree.map(jnp.copy, heads), tx, mesh)
    step_fn = steps.jit_train_step(
        steps.finetune_step, mesh, model=model, learning_rate_fns=schedules
    )
    key = jax.random.key(_SEED.value)

    loader = embedding_cache.train_loader(
        table, model, batch_size=_BATCH_SIZE.value, seed=_SEED.value, num_epochs=epochs
    )
    iterator = iter(loader)
    first = sharding.shard_batch(next(iterator), mesh)
    start = time.perf_counter()
    compiled = step_fn.lower(state, first, key).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, first, key)

    epoch_times = []
    step = 1
    for epoch in range(epochs):
        start = time.perf_counter()
        first_step = 1 if epoch == 0 else 0  # the compile run took batch 0
        for _ in range(first_step, steps_per_epoch):
            batch = sharding.shard_batch(next(iterator), mesh)
            state, metrics = compiled(state, batch, jax.random.fold_in(key, step))
            step += 1
        jax.block_until_ready((state, metrics))
        if epoch >= _WARMUP.value:
            epoch_times.append(time.perf_counter() - start)
    summary = common.summarize_times(epoch_times)
    return {
        "compile_s": compile_s,
        "epoch_time_s": summary,
        "step_time_s": summary["median"] / steps_per_epoch,
        "final_loss": float(metrics["loss"]),
    }


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _NUM_POSTS.value < _BATCH_SIZE.value:
        raise app.UsageError("--num_posts must be at least --batch_size")
    machine = common.machine_info()
    logging.info("Load average before the run: %s", machine["load_average"])

    model_config = jax_steps_lib.build_model_config(
        _PRESET.value, _DTYPE.value, _SCAN_LAYERS.value
    )
    model = create_model(model_config)
    mesh = sharding.create_mesh()
    params = init_params(model, jax.random.key(_SEED.value))
    sampler = batch_lib.LengthSampler(
        None, model.clip_config.text.max_position_embeddings
    )
    batch = batch_lib.random_batch(
        np.random.default_rng(_SEED.value),
        model.clip_config,
        _BATCH_SIZE.value,
        sampler,
    )
    batch = batch_lib.trim_text_padding(batch, [int(b) for b in _LENGTH_BUCKETS.value])
    logging.info(
        "Timing batches of %d posts, text trimmed to %d tokens",
        _BATCH_SIZE.value,
        batch_lib.text_length(batch),
    )

    frozen = time_frozen(model, params, mesh)
    encoding = time_encoding(model, params, mesh, batch)
    trainable = time_trainable(model, params, mesh, batch)

    steps_per_epoch = _NUM_POSTS.value // _BATCH_SIZE.value
    trainable_epoch_s = trainable["step_time_s"]["median"] * steps_per_epoch
    frozen_epoch_s = frozen["epoch_time_s"]["median"]
    speedups = {"per_epoch": trainable_epoch_s / frozen_epoch_s}
    for epochs in (int(e) for e in _RUN_EPOCHS.value):
        speedups[f"run_of_{epochs}_epochs_with_encoding"] = (
            epochs
            * trainable_epoch_s
            / (encoding["train_split_s"] + epochs * frozen_epoch_s)
        )

    results = {
        "preset": _PRESET.value,
        "dtype": _DTYPE.value,
        "scan_layers": _SCAN_LAYERS.value,
        "batch_size": _BATCH_SIZE.value,
        "num_posts": _NUM_POSTS.value,
        "steps_per_epoch": steps_per_epoch,
        "text_length": batch_lib.text_length(batch),
        "trainable": {**trainable, "epoch_time_s_estimate": trainable_epoch_s},
        "encoding": encoding,
        "frozen": frozen,
        "speedup": speedups,
        "host_memory": common.host_memory(),
        "machine": machine,
        "load_average_after": common.machine_info()["load_average"],
    }
    rows = [
        [
            "trainable towers",
            trainable["compile_s"],
            trainable["step_time_s"]["median"],
            trainable_epoch_s,
            _BATCH_SIZE.value / trainable["step_time_s"]["median"],
        ],
        [
            "tower encoding (once)",
            encoding["compile_s"],
            encoding["batch_time_s"]["median"],
            encoding["train_split_s"],
            encoding["posts_per_s"],
        ],
        [
            "frozen towers",
            frozen["compile_s"],
            frozen["step_time_s"],
            frozen_epoch_s,
            _NUM_POSTS.value / frozen_epoch_s,
        ],
    ]
    print(
        common.format_table(
            ["path", "compile s", "s / batch", "s / epoch", "posts / s"], rows
        )
    )
    runs = [
        f"{epochs}-epoch run with encoding {speedups[key]:.1f}x"
        for epochs in (int(e) for e in _RUN_EPOCHS.value)
        if (key := f"run_of_{epochs}_epochs_with_encoding") in speedups
    ]
    print(f"Speed-up: per epoch {speedups['per_epoch']:.0f}x; " + "; ".join(runs))
    if _OUTPUT.value:
        common.write_json(_OUTPUT.value, results)
        print(f"Results written to {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
