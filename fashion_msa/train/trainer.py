"""The main job: build the data, pre-train the adapter, fine-tune, select on val, test.

`train_and_evaluate(config, workdir)` runs both training stages with the jitted
steps of `fashion_msa.train.steps` on a data-parallel mesh over every device and
checkpoints with orbax. Running the same command again in the same workdir
resumes exactly. The stage, its step, the optimizer state and the input
iterator position come from the newest checkpoint, and every step's random key
is the run key folded with the global step.

With `config.train.freeze_towers`, the CLIP towers stay at their initial
parameters: every post is encoded once (see embedding_cache.py) and the stages
train only the fusion networks, the adapter and the classifier on the cached
embeddings. The state checkpoints then contain only those parameters. The best
checkpoints contain the whole model, so evaluate.py and predict.py read them as
they read any other run's.

Files written into the workdir (by process 0):
  config.json, clip_config.json   the run's configuration and tower shapes
  data/                           the built dataset (unless config.data.data_dir)
  checkpoints/, best/             orbax checkpoints (see checkpointing.py)
  embedding_cache/                tower outputs per split, with freeze_towers
                                  (unless config.train.embedding_cache_dir)
  metrics.jsonl, tensorboard/     training and validation metrics
  learning_curves.png, confusion_matrix_{split}.png
  results.json                    final metrics per split and run facts
"""

import dataclasses
import importlib.metadata
import json
import math
import pathlib
import platform
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax.training import train_state
from tqdm import tqdm

from fashion_msa.clip.tokenizer import load_tokenizer
from fashion_msa.model import factory
from fashion_msa.model.msa import TOWER_MODULE, FashionMSA
from fashion_msa.train import (
    checkpointing,
    embedding_cache,
    optimizer,
    padding,
    plotting,
    run_data,
    sharding,
    steps,
)
from fashion_msa.train import metrics as metrics_lib
from fashion_msa.train.writer import MetricWriter, read_records

CONFIG_FILE = "config.json"
CLIP_CONFIG_FILE = "clip_config.json"
RESULTS_FILE = "results.json"

# Metrics averaged over a logging interval; the others are logged at its last step.
_AVERAGED_METRICS = ("loss", "accuracy", "mean_sim", "matching_pair_fraction", "pairs")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage.

    Attributes:
      name: "pretrain" (adapter pre-training) or "finetune".
      index: position in the run (seeds the stage's shuffling).
      epochs: passes over the training split.
      steps_per_epoch: full batches per epoch.
      first_step: global step count before the stage's first update.
    """

    name: str
    index: int
    epochs: int
    steps_per_epoch: int
    first_step: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def last_step(self) -> int:
        return self.first_step + self.total_steps


def plan_stages(
    config: ml_collections.ConfigDict,
    model: FashionMSA,
    num_train: int,
    num_train_with_pseudo: int,
) -> list[Stage]:
    """Return the stages of the run.

    Adapter pre-training runs when the model has an adapter, the config enables
    it, and some training posts have pseudo data. Without pseudo data every pair
    would have weight 0.

    Raises:
      ValueError: no fine-tuning epochs, or fewer training posts than one batch.
    """
    per_epoch = run_data.steps_per_epoch(num_train, config.train.batch_size)
    if per_epoch < 1:
        raise ValueError(
            f"the training split has {num_train} posts, fewer than one batch of "
            f"{config.train.batch_size}; lower --config.train.batch_size"
        )
    if config.train.finetune_epochs < 1:
        raise ValueError(
            f"config.train.finetune_epochs must be at least 1, got "
            f"{config.train.finetune_epochs}"
        )
    stages = []
    wanted = config.model.pretrain_adapter and config.train.pretrain_epochs > 0
    if wanted and not model.config.has_adapter:
        logging.info(
            "Skipping adapter pre-training: the model has no adapter (fusion=%s, "
            "use_adapter=%s)",
            model.config.fusion,
            model.config.use_adapter,
        )
    elif wanted and num_train_with_pseudo == 0:
        logging.warning(
            "Skipping adapter pre-training: no training post has pseudo data, so "
            "no pair carries a consistency label; set config.data.pseudo_dir"
        )
    elif wanted:
        stages.append(Stage("pretrain", 0, config.train.pretrain_epochs, per_epoch, 0))
    first = stages[-1].last_step if stages else 0
    stages.append(
        Stage("finetune", len(stages), config.train.finetune_epochs, per_epoch, first)
    )
    return stages


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on."""
    versions = {"python": platform.python_version()}
    for name in (
        "fashion_msa",
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "numpy",
        "grain",
        "tensorflow-datasets",
    ):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclasses.dataclass(frozen=True)
class FrozenTowers:
    """The fixed tower parameters of a frozen-tower run and each split's embeddings.

    Attributes:
      params: the "clip" parameter collection, never updated.
      entries: the cache entry of every split the run reads.
    """

    params: Any
    entries: Mapping[str, embedding_cache.CacheEntry]


class Trainer:
    """State shared by the stages of one run: model, mesh, data, steps, checkpoints."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path):
        self.config = config
        self.workdir = workdir
        self.is_chief = jax.process_index() == 0
        self.mesh = sharding.create_mesh()
        sharding.check_batch_size(config.train.batch_size, self.mesh)
        sharding.check_batch_size(config.train.eval_batch_size, self.mesh)

        self.data_dir = run_data.ensure_dataset(
            config.data, workdir, show_progress=config.train.progress_bar
        )
        self.source = config.data.source
        self.build_report = run_data.build_report(self.data_dir, self.source)
        self.train_split = run_data.open_split(self.data_dir, self.source, "train")

        self.model = factory.create_model(config.model)
        self.tokenizer = load_tokenizer(config.model.clip.checkpoint or None)
        self.image_size = self.model.clip_config.vision.image_size
        self.optimizer_config = optimizer.optimizer_config_from_config(config.train)
        self.eval_step = steps.jit_eval_step(
            steps.eval_step, self.mesh, model=self.model
        )

        key = jax.random.key(config.seed)
        self.init_key, self.train_key = jax.random.split(key)
        self.writer = MetricWriter(workdir, enabled=self.is_chief)
        self.checkpoints = checkpointing.RunCheckpoints(
            workdir,
            max_to_keep=config.train.max_checkpoints_to_keep,
            async_save=config.train.async_checkpointing,
        )
        self.frozen: FrozenTowers | None = None

    # Frozen towers.

    def used_splits(self) -> list[str]:
        """Return the splits the run trains on, selects on and reports, once each."""
        splits = [
            "train",
            self.config.data.selection_split,
            self.config.data.test_split,
        ]
        return list(dict.fromkeys(s for s in splits if s))

    def freeze_towers(self, tower_params: Any) -> None:
        """Keep the towers fixed: load or compute the embeddings of every used split.

        Raises:
          NotADirectoryError: `config.train.embedding_cache_dir` is a file.
        """
        cache_dir = pathlib.Path(
            self.config.train.get("embedding_cache_dir")
            or self.workdir / embedding_cache.CACHE_DIR
        ).expanduser()
        if cache_dir.exists() and not cache_dir.is_dir():
            raise NotADirectoryError(
                f"config.train.embedding_cache_dir {cache_dir} is a file; pass a "
                "folder (it is created if missing), or '' for WORKDIR/embedding_cache"
            )
        logging.info(
            "Freezing the CLIP towers: config.train.tower_learning_rate (%g) is "
            "unused. Hashing the tower parameters.",
            self.config.train.tower_learning_rate,
        )
        towers_digest = embedding_cache.tree_digest(tower_params)
        entries = {}
        for split in self.used_splits():
            split_source = run_data.open_split(self.data_dir, self.source, split)
            key = embedding_cache.cache_key(
                self.model,
                tower_params,
                self.tokenizer,
                split_source,
                split,
                towers_digest=towers_digest,
            )

            def compute(split=split, split_source=split_source):
                return embedding_cache.compute_embeddings(
                    self.model,
                    tower_params,
                    split_source,
                    tokenizer=self.tokenizer,
                    batch_size=self.config.train.eval_batch_size,
                    mesh=self.mesh,
                    text_length_buckets=tuple(
                        self.config.train.get("text_length_buckets", ())
                    ),
                    num_workers=self.config.data.num_workers,
                    description=f"embed {split}",
                    show_progress=self.config.train.progress_bar and self.is_chief,
                )

            entries[split] = embedding_cache.load_or_compute(
                cache_dir, key, compute, write=self.is_chief
            )
        self.frozen = FrozenTowers(tower_params, entries)

    def head_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Return `params` without the towers when they are frozen, else unchanged."""
        if self.frozen is None:
            return dict(params)
        return {k: v for k, v in params.items() if k != TOWER_MODULE}

    def full_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Return `params` with the frozen towers added back (the checkpoint layout)."""
        if self.frozen is None:
            return dict(params)
        return {**params, TOWER_MODULE: self.frozen.params}

    # Train state.

    def create_state(
        self, stage: Stage, params: Any
    ) -> tuple[train_state.TrainState, Mapping[str, Callable[[Any], Any]]]:
        """Build the stage's optimizer and a replicated train state at step 0."""
        tx, schedules = optimizer.create_optimizer(
            self.optimizer_config, params, stage.name, stage.total_steps
        )
        if self.frozen is not None:
            # The towers have no parameters in the state, so no rate to log.
            schedules = {k: v for k, v in schedules.items() if k != "tower"}
        return steps.create_train_state(self.model, params, tx, self.mesh), schedules

    # Evaluation.

    def evaluate(self, params: Any, split: str) -> dict[str, Any]:
        """Evaluate `params` on every post of `split`."""
        batch_size = self.config.train.eval_batch_size
        if self.frozen is not None:
            split_source = self.frozen.entries[split].table
            loader = embedding_cache.eval_loader(
                split_source, self.model, batch_size=batch_size
            )
        else:
            split_source = run_data.open_split(self.data_dir, self.source, split)
            loader = run_data.eval_loader(
                split_source,
                batch_size=batch_size,
                image_size=self.image_size,
                tokenizer=self.tokenizer,
                num_workers=self.config.data.num_workers,
            )
        return evaluate_loader(
            self.eval_step,
            self.head_params(params),
            loader,
            self.mesh,
            description=f"eval {split}",
            show_progress=self.config.train.progress_bar and self.is_chief,
            has_adapter=self.model.config.has_adapter,
            num_batches=math.ceil(len(split_source) / batch_size),
        )

    # Training.

    def run_stage(
        self,
        stage: Stage,
        state: train_state.TrainState,
        schedules: Mapping[str, Callable[[Any], Any]],
        start_step: int,
        loader_state: str | None,
    ) -> train_state.TrainState:
        """Train `stage` from its step `start_step` to its end, returning the state."""
        config = self.config.train
        step_fn = steps.jit_train_step(
            steps.pretrain_step if stage.name == "pretrain" else steps.finetune_step,
            self.mesh,
            model=self.model,
            learning_rate_fns=schedules,
        )
        if self.frozen is not None:
            loader = embedding_cache.train_loader(
                self.frozen.entries["train"].table,
                self.model,
                batch_size=config.batch_size,
                seed=self.config.seed + stage.index,
                num_epochs=stage.epochs,
            )
            text_buckets = ()  # the batches carry embeddings, not tokens
        else:
            loader = run_data.train_loader(
                self.train_split,
                batch_size=config.batch_size,
                image_size=self.image_size,
                tokenizer=self.tokenizer,
                seed=self.config.seed + stage.index,
                num_epochs=stage.epochs,
                num_workers=self.config.data.num_workers,
            )
            # Trimming is exact, and each bucket compiles the step once.
            text_buckets = tuple(config.get("text_length_buckets", ()))
        iterator = iter(loader)
        if loader_state is not None:
            iterator.set_state(loader_state.encode())

        logging.info(
            "Stage %s: %d epochs x %d steps of %d posts (global steps %d-%d), "
            "starting after stage step %d",
            stage.name,
            stage.epochs,
            stage.steps_per_epoch,
            config.batch_size,
            stage.first_step + 1,
            stage.last_step,
            start_step,
        )
        # Metrics stay on device until a log, checkpoint or eval step needs them.
        # NOTE: after a resume, the first logged interval averages only the steps
        # run since the resume when checkpoints and logs fall on different steps.
        pending: list[tuple[int, dict[str, jax.Array]]] = []
        interval: list[tuple[int, dict[str, float]]] = []
        interval_start = time.perf_counter()
        bar = tqdm(
            total=stage.total_steps,
            initial=start_step,
            desc=stage.name,
            unit="step",
            disable=not (config.progress_bar and self.is_chief),
        )
        for stage_step in range(start_step + 1, stage.total_steps + 1):
            global_step = stage.first_step + stage_step
            host_batch = next(iterator)
            if text_buckets:
                host_batch = padding.trim_batch_text(host_batch, text_buckets)
            batch = sharding.shard_batch(host_batch, self.mesh)
            if stage_step == start_step + 1:
                logging.info("Compiling the first %s step", stage.name)
            rng = jax.random.fold_in(self.train_key, global_step)
            state, step_metrics = step_fn(state, batch, rng)
            pending.append((global_step, step_metrics))
            bar.update(1)

            last = stage_step == stage.total_steps
            epoch_end = stage_step % stage.steps_per_epoch == 0
            log_due = global_step % config.log_every_steps == 0 or last
            checkpoint_due = global_step % config.checkpoint_every_steps == 0 or last
            epoch = stage_step // stage.steps_per_epoch
            eval_due = (
                stage.name == "finetune"
                and epoch_end
                and (epoch % config.eval_every_epochs == 0 or last)
            )

            if log_due or checkpoint_due or eval_due:
                interval.extend(fetch_and_check(pending, stage.name, self.checkpoints))
                pending = []
            if log_due and interval:
                seconds = time.perf_counter() - interval_start
                summary = summarize_interval(interval, seconds)
                self.writer.write(global_step, stage.name, "train", summary)
                bar.set_postfix(loss=f"{summary['loss']:.4f}")
                logging.info(
                    "[%s %d] %s",
                    stage.name,
                    global_step,
                    ", ".join(f"{k}={v:.4g}" for k, v in summary.items()),
                )
                interval = []
                interval_start = time.perf_counter()
            if eval_due:
                self.validate(state.params, global_step, epoch)
            if checkpoint_due:
                progress = {
                    "stage": stage.name,
                    "stage_step": stage_step,
                    "global_step": global_step,
                    "loader_state": iterator.get_state().decode(),
                    "seed": self.config.seed,
                }
                self.checkpoints.save_state(global_step, state, progress)
        bar.close()
        self.writer.flush()
        return state

    def validate(self, params: Any, global_step: int, epoch: int) -> None:
        """Evaluate on the selection split, log it, and offer the params as best."""
        split = self.config.data.selection_split
        val = self.evaluate(params, split)
        scalars = {k: v for k, v in val.items() if isinstance(v, float)}
        self.writer.write(global_step, "finetune", "val", scalars)
        self.writer.flush()
        logging.info(
            "[finetune %d] epoch %d %s: accuracy=%.4f macro_f1=%.4f loss=%.4f",
            global_step,
            epoch,
            split,
            val["accuracy"],
            val["macro_f1"],
            val["loss"],
        )
        if global_step in self.checkpoints.best.all_steps():
            # A resumed run repeats an evaluation whose checkpoint already exists.
            return
        best_metrics = {
            checkpointing.BEST_METRIC: val["macro_f1"],
            "split": split,
            "epoch": epoch,
            "metrics": val,
        }
        self.checkpoints.save_best(global_step, self.full_params(params), best_metrics)


def fetch_and_check(
    pending: list[tuple[int, dict[str, jax.Array]]],
    stage: str,
    checkpoints: checkpointing.RunCheckpoints,
) -> list[tuple[int, dict[str, float]]]:
    """Copy pending step metrics to the host and stop at the first non-finite loss.

    Raises:
      NonFiniteLossError: naming the first step whose loss is NaN or infinite and
        the newest checkpoint, which contains the last good state.
    """
    fetched = jax.device_get(pending)
    out = []
    for global_step, values in fetched:
        values = {k: float(v) for k, v in values.items()}
        if not math.isfinite(values["loss"]):
            checkpoints.wait_until_finished()
            raise NonFiniteLossError(
                f"non-finite {stage} loss {values['loss']} at global step "
                f"{global_step} (grad_norm {values['grad_norm']}); the last good "
                f"checkpoint is step {checkpoints.latest_step()}. Lower the learning "
                "rates or check the inputs before resuming."
            )
        out.append((global_step, values))
    return out


def summarize_interval(
    interval: list[tuple[int, dict[str, float]]], seconds: float
) -> dict[str, float]:
    """Average the loss-like metrics over the interval; take the others at its end."""
    summary = dict(interval[-1][1])
    for key in _AVERAGED_METRICS:
        if key in summary:
            summary[key] = float(np.mean([values[key] for _, values in interval]))
    summary["steps_per_second"] = len(interval) / max(seconds, 1e-9)
    return summary


def evaluate_loader(
    eval_step: Callable[[Any, Mapping[str, jax.Array]], dict[str, jax.Array]],
    params: Any,
    loader: Any,
    mesh: jax.sharding.Mesh,
    *,
    description: str = "eval",
    show_progress: bool = False,
    has_adapter: bool = True,
    num_batches: int | None = None,
) -> dict[str, Any]:
    """Sum `eval_step` over a loader and turn the sums into metrics.

    Returns the dict of `metrics.metrics_from_confusion` plus `loss` (mean
    cross-entropy) and, for models with an adapter, `mean_sim`.
    """
    totals = None
    batches = tqdm(
        loader,
        desc=description,
        unit="batch",
        total=num_batches,
        leave=False,
        disable=not show_progress,
    )
    for batch in batches:
        out = eval_step(params, sharding.shard_batch(batch, mesh))
        # Summing on device keeps the loop asynchronous; one copy to host at the end.
        totals = (
            out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
        )
    if totals is None:
        raise ValueError(f"{description}: the split has no posts")
    totals = jax.device_get(totals)
    result = metrics_lib.metrics_from_confusion(np.asarray(totals["confusion"]))
    count = max(int(totals["count"]), 1)
    result["loss"] = float(totals["loss_sum"]) / count
    if has_adapter:
        result["mean_sim"] = float(totals["sim_sum"]) / count
    return result


def _save_run_config(trainer: Trainer) -> None:
    """Write config.json and clip_config.json; warn if a resumed run changed config.

    Raises:
      ValueError: the workdir has checkpoints of a run with the other
        `freeze_towers` setting, whose train state has another structure.
    """
    config_path = trainer.workdir / CONFIG_FILE
    current = json.loads(trainer.config.to_json_best_effort())
    if config_path.is_file():
        saved = json.loads(config_path.read_text())
        frozen_before = bool(saved.get("train", {}).get("freeze_towers", False))
        frozen_now = bool(current["train"].get("freeze_towers", False))
        resuming = trainer.checkpoints.latest_step() is not None
        if frozen_before != frozen_now and resuming:
            raise ValueError(
                f"{trainer.workdir} has checkpoints of a run with "
                f"config.train.freeze_towers={frozen_before}, and this run sets "
                f"{frozen_now}. A frozen run's checkpoints contain only the heads' "
                "train state, so neither kind of run can resume the other. Use a "
                "new --workdir or the same setting."
            )
        if saved != current:
            logging.warning(
                "The config differs from the one saved in %s; a resumed run is "
                "exact only with the same config",
                config_path,
            )
    if trainer.is_chief:
        config_path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
        (trainer.workdir / CLIP_CONFIG_FILE).write_text(
            json.dumps(trainer.model.clip_config.to_hf_dict(), indent=2) + "\n"
        )


def _resume_point(trainer: Trainer, stages: list[Stage]) -> tuple[int, int, str | None]:
    """Return (stage index, stage step, loader state) where the run continues."""
    latest = trainer.checkpoints.latest_step()
    if latest is None:
        # Records of an earlier attempt that crashed before its first checkpoint.
        trainer.writer.truncate_after(0)
        return 0, 0, None
    progress = trainer.checkpoints.restore_progress(latest)
    names = [stage.name for stage in stages]
    if progress["stage"] not in names:
        raise ValueError(
            f"the checkpoint at step {latest} in {trainer.workdir} is from stage "
            f"{progress['stage']!r}, which this config does not run; use a new workdir"
        )
    index = names.index(progress["stage"])
    logging.info(
        "Resuming from the checkpoint at global step %d (stage %s, step %d)",
        latest,
        progress["stage"],
        progress["stage_step"],
    )
    trainer.writer.truncate_after(latest)
    return index, progress["stage_step"], progress["loader_state"]


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> dict[str, Any]:
    """Train both stages, pick the best validation checkpoint, and evaluate it.

    Rerunning the same call in the same workdir resumes from the newest
    checkpoint; a finished run goes straight to the final evaluation.

    Returns:
      The content of WORKDIR/results.json.
    """
    start_time = time.perf_counter()
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    logging.info("Config:\n%s", config)
    logging.info(
        "%d devices over %d processes; global batch %d, %d per device",
        jax.device_count(),
        jax.process_count(),
        config.train.batch_size,
        config.train.batch_size // jax.device_count(),
    )

    trainer = Trainer(config, workdir)
    _save_run_config(trainer)
    num_train = len(trainer.train_split)
    num_train_with_pseudo = trainer.build_report["pseudo_sizes"].get("train", 0)
    stages = plan_stages(config, trainer.model, num_train, num_train_with_pseudo)

    params = factory.create_params(trainer.model, config.model, trainer.init_key)
    logging.info(
        "Model parameters: %d (CLIP towers %d)",
        factory.count_parameters(params),
        factory.count_parameters(params["clip"]),
    )

    if config.train.get("freeze_towers", False):
        trainer.freeze_towers(params[TOWER_MODULE])
        params = trainer.head_params(params)

    # Find where to continue, then run the remaining stages.
    stage_index, stage_step, loader_state = _resume_point(trainer, stages)
    latest = trainer.checkpoints.latest_step()
    for stage in stages[stage_index:]:
        state, schedules = trainer.create_state(stage, params)
        if latest is not None and stage.index == stage_index:
            state = trainer.checkpoints.restore_state(latest, state)
        else:
            stage_step, loader_state = 0, None
        if stage_step < stage.total_steps:
            state = trainer.run_stage(stage, state, schedules, stage_step, loader_state)
        params = state.params
        del state
    trainer.checkpoints.wait_until_finished()

    # Evaluate the best validation checkpoint on every reported split.
    best_step, best_params, best_info = trainer.checkpoints.restore_best(
        trainer.full_params(params)
    )
    logging.info(
        "Best checkpoint: global step %d (%s macro-F1 %.4f)",
        best_step,
        best_info["split"],
        best_info[checkpointing.BEST_METRIC],
    )
    results_by_split = {}
    for split in (config.data.selection_split, config.data.test_split):
        if split and split not in results_by_split:
            results_by_split[split] = trainer.evaluate(best_params, split)

    results = {
        "metrics": results_by_split,
        "best_checkpoint": {"global_step": best_step, "epoch": best_info["epoch"]},
        "stages": [
            {**dataclasses.asdict(stage), "total_steps": stage.total_steps}
            for stage in stages
        ],
        "seed": config.seed,
        "freeze_towers": trainer.frozen is not None,
        "embedding_cache": (
            {}
            if trainer.frozen is None
            else {s: e.summary() for s, e in trainer.frozen.entries.items()}
        ),
        "data": {
            "source": trainer.source,
            "data_dir": str(trainer.data_dir),
            "split_sizes": trainer.build_report["split_sizes"],
            "pseudo_sizes": trainer.build_report["pseudo_sizes"],
            "skipped": len(trainer.build_report["skipped"]),
            "dropped": len(trainer.build_report["dropped"]),
        },
        "devices": {
            "platform": jax.devices()[0].platform,
            "device_count": jax.device_count(),
            "process_count": jax.process_count(),
        },
        "versions": package_versions(),
        "wall_time_seconds": time.perf_counter() - start_time,
        "config": json.loads(config.to_json_best_effort()),
    }
    if trainer.is_chief:
        _write_outputs(workdir, results)
    trainer.writer.close()
    trainer.checkpoints.close()
    print(metrics_lib.format_metrics_table(results_by_split))
    return results


def _write_outputs(workdir: pathlib.Path, results: dict[str, Any]) -> None:
    """Write results.json and the PNG plots."""
    (workdir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    plotting.plot_learning_curves(
        read_records(workdir), workdir / "learning_curves.png"
    )
    for split, split_metrics in results["metrics"].items():
        plotting.plot_confusion_matrix(
            split_metrics["confusion_matrix"],
            workdir / f"confusion_matrix_{split}.png",
            title=f"Confusion matrix ({split})",
        )
    logging.info("Results written to %s", workdir / RESULTS_FILE)
