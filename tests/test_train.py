"""End-to-end tests of train_and_evaluate, kill-and-resume, evaluation and prediction.

One small run on a 60-post synthetic set (tiny CLIP, batch 8: 5 pre-training
and 10 fine-tuning steps) is shared by the tests of this file. A persistent
XLA compilation cache in a temporary folder lets the subprocess runs reuse the
executables that the in-process run compiled.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from conftest import REPO_ROOT
from flax.training import train_state

from configs import demo
from fashion_msa.data import builder, pipeline
from fashion_msa.model import factory
from fashion_msa.train import inference, optimizer, trainer
from fashion_msa.train.checkpointing import RunCheckpoints
from fashion_msa.train.writer import read_records

NUM_POSTS = 60
OVERRIDES = {
    "model.hidden_dim": 32,
    "model.adapter_hidden_dim": 32,
    "train.batch_size": 8,
    "train.eval_batch_size": 16,
    "train.pretrain_epochs": 1,
    "train.finetune_epochs": 2,
    "train.eval_every_epochs": 1,
    "train.log_every_steps": 2,
    "train.checkpoint_every_steps": 2,
    "train.max_checkpoints_to_keep": 20,
    "train.progress_bar": False,
}


def _config(data_dir: pathlib.Path) -> ml_collections.ConfigDict:
    config = demo.get_config()
    config.data.data_dir = str(data_dir)
    for key, value in OVERRIDES.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def _flags(data_dir: pathlib.Path, workdir: pathlib.Path) -> list[str]:
    flags = [
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
    ]
    flags += [f"--config.{key}={value}" for key, value in OVERRIDES.items()]
    return flags


def _env(cache_dir: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("synthetic")
    builder.build_dataset(
        "synthetic", root / "posts", root / "data", num_posts=NUM_POSTS, seed=0
    )
    return root / "data"


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("xla_cache")
    settings = {
        "jax_compilation_cache_dir": str(cache_dir),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    previous = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    yield cache_dir
    for name, value in previous.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def finished_run(data_dir, compile_cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    results = trainer.train_and_evaluate(_config(data_dir), workdir)
    return workdir, results


def test_run_writes_outputs(finished_run):
    workdir, results = finished_run
    for name in (
        "results.json",
        "config.json",
        "clip_config.json",
        "metrics.jsonl",
        "learning_curves.png",
        "confusion_matrix_val.png",
        "confusion_matrix_test.png",
    ):
        assert (workdir / name).is_file(), name
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "results.json").read_text()) == results


def test_results_content(finished_run):
    _, results = finished_run
    assert set(results["metrics"]) == {"val", "test"}
    test = results["metrics"]["test"]
    assert test["num_examples"] == results["data"]["split_sizes"]["test"]
    assert 0.0 <= test["macro_f1"] <= 1.0
    assert np.array(test["confusion_matrix"]).shape == (3, 3)
    assert [s["name"] for s in results["stages"]] == ["pretrain", "finetune"]
    assert results["stages"][1]["first_step"] == results["stages"][0]["total_steps"]
    assert results["seed"] == 0
    assert results["versions"]["jax"] == jax.__version__
    assert results["config"]["train"]["batch_size"] == 8
    assert results["wall_time_seconds"] > 0


def test_metrics_log_covers_both_stages(finished_run):
    workdir, results = finished_run
    records = read_records(workdir)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert {r["stage"] for r in train} == {"pretrain", "finetune"}
    assert len(val) == 2  # one validation per fine-tuning epoch
    for record in train:
        for key in ("loss", "accuracy", "grad_norm", "param_norm"):
            assert np.isfinite(record[key]), (key, record)
        assert "learning_rate/tower" in record
        assert "learning_rate/heads" in record
    best_step = results["best_checkpoint"]["global_step"]
    best_f1 = max(r["macro_f1"] for r in val)
    assert [r["macro_f1"] for r in val if r["step"] == best_step] == [best_f1]


def test_best_checkpoint_reproduces_val_metrics(finished_run):
    workdir, results = finished_run
    val = [r for r in read_records(workdir) if r["split"] == "val"]
    best_step = results["best_checkpoint"]["global_step"]
    logged = next(r for r in val if r["step"] == best_step)
    assert results["metrics"]["val"]["macro_f1"] == logged["macro_f1"]
    assert results["metrics"]["val"]["accuracy"] == logged["accuracy"]


def test_rerun_of_finished_run_only_evaluates(finished_run, data_dir):
    workdir, results = finished_run
    again = trainer.train_and_evaluate(_config(data_dir), workdir)
    assert again["metrics"] == results["metrics"]
    assert again["best_checkpoint"] == results["best_checkpoint"]


def _finished_checkpoints(workdir: pathlib.Path) -> list[int]:
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_kill_and_resume_matches_uninterrupted_run(
    finished_run, data_dir, compile_cache, tmp_path
):
    _, reference = finished_run
    workdir = tmp_path / "resumed"
    command = [sys.executable, "-m", "launch.train", *_flags(data_dir, workdir)]
    env = _env(compile_cache)
    total_steps = reference["stages"][-1]["first_step"] + 10

    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not _finished_checkpoints(workdir) and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    killed_at = _finished_checkpoints(workdir)
    assert killed_at, "no checkpoint was written before the deadline"
    assert not (workdir / "results.json").exists()
    assert max(killed_at) < total_steps

    resumed = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from the checkpoint at global step" in resumed.stderr

    results = json.loads((workdir / "results.json").read_text())
    assert results["metrics"] == reference["metrics"]
    assert results["best_checkpoint"] == reference["best_checkpoint"]

    def comparable(records):
        return [
            {k: v for k, v in r.items() if k != "steps_per_second"} for r in records
        ]

    assert comparable(read_records(workdir)) == comparable(
        read_records(finished_run[0])
    )


def test_frozen_final_fusion_survives_pretraining(finished_run, data_dir):
    """The checkpoint at the end of pre-training keeps the initial final fusion."""
    workdir, results = finished_run
    config = _config(data_dir)
    model = factory.create_model(config.model)
    init_key, _ = jax.random.split(jax.random.key(config.seed))
    params = factory.create_params(model, config.model, init_key)
    pretrain_steps = results["stages"][0]["total_steps"]
    tx, _ = optimizer.create_optimizer(
        optimizer.optimizer_config_from_config(config.train),
        params,
        "pretrain",
        pretrain_steps,
    )
    target = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    checkpoints = RunCheckpoints(workdir, read_only=True)
    restored = checkpoints.restore_state(pretrain_steps, target)
    checkpoints.close()

    for name in ("pseudo_fusion", "final_fusion", "classifier"):
        before = jax.tree.leaves(params[name])
        after = jax.tree.leaves(restored.params[name])
        for old, new in zip(before, after, strict=True):
            assert np.asarray(old).tobytes() == np.asarray(new).tobytes(), name
    changed = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: not np.array_equal(a, b),
            params["adapter"],
            restored.params["adapter"],
        )
    )
    assert any(changed), "the adapter did not train during pre-training"


def test_evaluate_split_matches_results(finished_run):
    workdir, results = finished_run
    trained = inference.load_trained(workdir)
    assert trained.best_step == results["best_checkpoint"]["global_step"]
    test = inference.evaluate_split(trained, "test", show_progress=False)
    assert test == results["metrics"]["test"]


def _prediction_posts(data_dir: pathlib.Path, path: pathlib.Path) -> list[dict]:
    """Write the test posts as prediction input: raw files, some with pseudo data."""
    posts_dir = data_dir.parent / "posts"
    manifest = [json.loads(line) for line in (posts_dir / "manifest.jsonl").open()]
    lines = []
    for record in manifest:
        if record["split"] != "test":
            continue
        post = {
            "id": record["id"],
            "text": record["text"],
            "image": str(posts_dir / record["image"]),
            "attributes": record["attributes"],
        }
        pseudo_image = posts_dir / "pseudo" / "images" / f"{record['id']}.png"
        if pseudo_image.is_file():
            post["pseudo_image"] = str(pseudo_image)
            post["pseudo_attributes"] = {"mood": "calm"}
        lines.append(post)
    path.write_text("".join(json.dumps(p) + "\n" for p in lines))
    return lines


def test_predict_posts_with_and_without_pseudo(finished_run, data_dir, tmp_path):
    workdir, _ = finished_run
    trained = inference.load_trained(workdir)
    posts_file = tmp_path / "posts.jsonl"
    lines = _prediction_posts(data_dir, posts_file)
    posts, errors = inference.read_posts(posts_file, trained.image_size)
    assert errors == []
    predictions = inference.predict_posts(trained, posts)

    assert [p["id"] for p in predictions] == [line["id"] for line in lines]
    with_pseudo = [p for p in predictions if p["has_pseudo"]]
    without_pseudo = [p for p in predictions if not p["has_pseudo"]]
    assert with_pseudo and without_pseudo
    for prediction in predictions:
        probabilities = prediction["probabilities"]
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert prediction["label"] == max(probabilities, key=probabilities.get)
    assert all(0.0 < p["mean_sim"] < 1.0 for p in with_pseudo)
    assert all(p["mean_sim"] is None for p in without_pseudo)


def test_predict_batch_matches_pipeline_batch(finished_run, data_dir):
    """Posts read from raw files classify exactly as the same posts from the dataset."""
    workdir, _ = finished_run
    trained = inference.load_trained(workdir)
    split = builder.load_split(data_dir, "synthetic", "test")
    records = [split[i] for i in range(4)]
    pipeline_batch = pipeline.BatchPreprocessor(trained.image_size, trained.tokenizer)(
        records
    )
    posts_dir = data_dir.parent / "posts"
    raw = []
    for index, record in enumerate(records):
        post_id = record["id"].decode()
        entry = {
            "id": post_id,
            "text": record["text"].decode(),
            "image": str(posts_dir / "images" / f"{post_id}.png"),
            "attributes": record["attributes"].decode(),
        }
        if record["has_pseudo"]:
            entry["pseudo_image"] = str(
                posts_dir / "pseudo" / "images" / f"{post_id}.png"
            )
            entry["pseudo_attributes"] = record["pseudo"]["attributes"].decode()
        raw.append(
            inference.parse_post(entry, index + 1, posts_dir, trained.image_size)
        )
    raw_batch = inference.make_batch(raw, trained.tokenizer, 4, trained.image_size)
    for key, value in pipeline_batch.items():
        if key != "label":
            np.testing.assert_array_equal(raw_batch[key], value, err_msg=key)


def test_predict_and_evaluate_launchers(
    finished_run, data_dir, compile_cache, tmp_path
):
    workdir, results = finished_run
    env = _env(compile_cache)
    posts_file = tmp_path / "posts.jsonl"
    lines = _prediction_posts(data_dir, posts_file)
    with posts_file.open("a") as f:
        f.write(
            json.dumps({"id": "broken", "text": "x", "image": "missing.png"}) + "\n"
        )
    output = tmp_path / "predictions.jsonl"
    predict = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.predict",
            f"--workdir={workdir}",
            f"--input={posts_file}",
            f"--output={output}",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # One unusable line: reported, written with its error, exit status 1.
    assert predict.returncode == 1, predict.stderr[-3000:]
    written = [json.loads(line) for line in output.open()]
    assert len(written) == len(lines) + 1
    assert "not found" in written[-1]["error"]
    assert all("label" in record for record in written[:-1])

    evaluate = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.evaluate",
            f"--workdir={workdir}",
            "--split=test",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert "macro_f1" in evaluate.stdout
    evaluated = json.loads((workdir / "eval_synthetic_test.json").read_text())
    assert evaluated["metrics"] == results["metrics"]["test"]


def test_nonfinite_loss_names_step(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, async_save=False)
    finite = {"loss": np.float32(0.5), "grad_norm": np.float32(1.0)}
    nan = {"loss": np.float32("nan"), "grad_norm": np.float32("nan")}
    pending = [(7, finite), (8, nan), (9, nan)]
    with pytest.raises(trainer.NonFiniteLossError, match="global step 8"):
        trainer.fetch_and_check(pending, "finetune", checkpoints)
    checkpoints.close()


def test_too_small_training_split_rejected(data_dir):
    config = _config(data_dir)
    config.train.batch_size = 1024
    model = factory.create_model(config.model)
    with pytest.raises(ValueError, match="fewer than one batch"):
        trainer.plan_stages(config, model, 42, 40)
