"""Tests for the grain input pipeline over a built synthetic dataset."""

import numpy as np
import pytest

from fashion_msa.clip.image_processing import preprocess_image
from fashion_msa.clip.tokenizer import load_tokenizer
from fashion_msa.data import builder, pipeline

IMAGE_SIZE = 16
BATCH_KEYS = {
    "text/input_ids",
    "text/attention_mask",
    "attributes/input_ids",
    "attributes/attention_mask",
    "pseudo_attributes/input_ids",
    "pseudo_attributes/attention_mask",
    "image",
    "pseudo_image",
    "has_pseudo",
    "label",
    "valid",
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def train_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    builder.build_dataset(
        "synthetic", root / "input", root / "data", num_posts=40, image_size=IMAGE_SIZE
    )
    return builder.load_split(root / "data", "synthetic", "train")


def train_loader(source, tokenizer, **overrides):
    options = dict(
        global_batch_size=8,
        image_size=IMAGE_SIZE,
        tokenizer=tokenizer,
        seed=0,
        num_epochs=2,
        process_index=0,
        process_count=1,
    )
    options.update(overrides)
    return pipeline.make_train_loader(source, **options)


def eval_loader(source, tokenizer, **overrides):
    options = dict(
        global_batch_size=8,
        image_size=IMAGE_SIZE,
        tokenizer=tokenizer,
        process_index=0,
        process_count=1,
    )
    options.update(overrides)
    return pipeline.make_eval_loader(source, **options)


def assert_batches_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_train_batch_shapes_and_types(train_source, tokenizer):
    batch = next(iter(train_loader(train_source, tokenizer)))

    assert set(batch) == BATCH_KEYS
    for key in BATCH_KEYS:
        if key.endswith(("input_ids", "attention_mask")):
            assert (batch[key].shape, batch[key].dtype) == ((8, 77), np.int32), key
    for key in ("image", "pseudo_image"):
        assert batch[key].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
        assert batch[key].dtype == np.float32
    assert (batch["label"].shape, batch["label"].dtype) == ((8,), np.int32)
    assert batch["has_pseudo"].dtype == bool
    assert batch["valid"].all()


def test_train_rows_are_the_records_of_record_indices(train_source, tokenizer):
    loader = train_loader(train_source, tokenizer)
    preprocessor = pipeline.BatchPreprocessor(IMAGE_SIZE, tokenizer)
    batches = pipeline.TrainBatches(
        train_source,
        preprocessor,
        global_batch_size=8,
        seed=0,
        num_epochs=2,
        process_index=0,
        process_count=1,
    )
    for step, batch in enumerate(loader):
        records = [train_source[int(i)] for i in batches.record_indices(step)]
        assert_batches_equal(batch, preprocessor(records))

        for row, record in enumerate(records):
            np.testing.assert_array_equal(
                batch["image"][row], preprocess_image(record["image"], IMAGE_SIZE)
            )
            if record["has_pseudo"]:
                np.testing.assert_array_equal(
                    batch["pseudo_image"][row],
                    preprocess_image(record["pseudo"]["image"], IMAGE_SIZE),
                )
            else:
                # Posts without pseudo data get a zero image, masked by has_pseudo.
                assert not batch["has_pseudo"][row]
                assert not batch["pseudo_image"][row].any()
            text = tokenizer([record["text"].decode()])
            np.testing.assert_array_equal(
                batch["text/input_ids"][row], text["input_ids"][0]
            )


def test_epochs_are_reshuffled_permutations(train_source, tokenizer):
    batches = pipeline.TrainBatches(
        train_source,
        pipeline.BatchPreprocessor(IMAGE_SIZE, tokenizer),
        global_batch_size=8,
        seed=3,
        num_epochs=3,
        process_index=0,
        process_count=1,
    )
    num_records = len(train_source)
    assert num_records == 28
    assert batches.steps_per_epoch == 3 == pipeline.train_steps_per_epoch(28, 8)

    epochs = []
    for epoch in range(3):
        steps = range(epoch * 3, epoch * 3 + 3)
        order = np.concatenate([batches.record_indices(step) for step in steps])
        assert len(order) == 24
        assert len(set(order.tolist())) == 24
        assert set(order.tolist()) <= set(range(num_records))
        epochs.append(order)
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])


def test_same_seed_same_batches(train_source, tokenizer):
    first = list(train_loader(train_source, tokenizer, seed=5))
    second = list(train_loader(train_source, tokenizer, seed=5))
    other = list(train_loader(train_source, tokenizer, seed=6))

    # 28 posts, batches of 8: 3 full batches per epoch, the last 4 posts dropped.
    assert len(first) == 6
    for a, b in zip(first, second, strict=True):
        assert_batches_equal(a, b)
    assert any(
        not np.array_equal(a["image"], b["image"])
        for a, b in zip(first, other, strict=True)
    )


def test_processes_split_the_global_batch(train_source, tokenizer):
    single = list(train_loader(train_source, tokenizer))
    halves = [
        list(train_loader(train_source, tokenizer, process_index=i, process_count=2))
        for i in range(2)
    ]
    assert [len(half) for half in halves] == [6, 6]
    for step, whole in enumerate(single):
        assert halves[0][step]["label"].shape == (4,)
        for key in whole:
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, whole[key], err_msg=key)


def test_resume_from_saved_state(train_source, tokenizer):
    iterator = iter(train_loader(train_source, tokenizer, num_epochs=None))
    for _ in range(4):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]

    resumed = iter(train_loader(train_source, tokenizer, num_epochs=None))
    resumed.set_state(state)
    for batch in expected:
        assert_batches_equal(next(resumed), batch)


def test_resume_rejects_a_different_pipeline(train_source, tokenizer):
    iterator = iter(train_loader(train_source, tokenizer, num_epochs=None))
    next(iterator)
    state = iterator.get_state()
    other = iter(train_loader(train_source, tokenizer, num_epochs=None, seed=1))
    with pytest.raises(ValueError, match="seed=0"):
        other.set_state(state)


def test_eval_covers_every_post_once(train_source, tokenizer):
    batches = list(eval_loader(train_source, tokenizer))

    # 28 posts in batches of 8: 3 full batches and one with 4 padding rows.
    assert len(batches) == 4 == pipeline.eval_num_batches(28, 8)
    valid = np.concatenate([batch["valid"] for batch in batches])
    assert valid.tolist() == [True] * 28 + [False] * 4

    records = [train_source[i] for i in range(28)]
    texts = tokenizer([record["text"].decode() for record in records])
    ids = np.concatenate([batch["text/input_ids"] for batch in batches])[valid]
    np.testing.assert_array_equal(ids, texts["input_ids"])
    labels = np.concatenate([batch["label"] for batch in batches])[valid]
    np.testing.assert_array_equal(labels, [record["label"] for record in records])

    last = batches[-1]
    padding = ~last["valid"]
    assert not last["image"][padding].any()
    assert not last["pseudo_image"][padding].any()
    assert not last["has_pseudo"][padding].any()
    assert (last["label"][padding] == 0).all()


def test_eval_across_processes(train_source, tokenizer):
    whole = list(eval_loader(train_source, tokenizer))
    parts = [
        list(eval_loader(train_source, tokenizer, process_index=i, process_count=2))
        for i in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for step, batch in enumerate(whole):
        for key in batch:
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key], err_msg=key)


def test_worker_processes_give_the_same_batches(train_source, tokenizer):
    in_process = list(train_loader(train_source, tokenizer, num_epochs=1))
    with_workers = list(
        train_loader(train_source, tokenizer, num_epochs=1, worker_count=2)
    )
    assert len(with_workers) == len(in_process) == 3
    for a, b in zip(in_process, with_workers, strict=True):
        assert_batches_equal(a, b)


def test_batch_size_must_split_over_processes(train_source, tokenizer):
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        train_loader(train_source, tokenizer, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="fewer than one batch of 64"):
        train_loader(train_source, tokenizer, global_batch_size=64)


def test_default_process_layout_uses_jax(train_source, tokenizer):
    loader = pipeline.make_train_loader(
        train_source,
        global_batch_size=8,
        image_size=IMAGE_SIZE,
        tokenizer=tokenizer,
        seed=0,
        num_epochs=1,
    )
    assert len(list(loader)) == 3
