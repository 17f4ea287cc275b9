"""Training, evaluation and prediction for FashionMSA.

  steps          pure pre-training, fine-tuning, eval and predict steps
  optimizer      AdamW with tower and head learning rates, stage masks
  sharding       the data-parallel mesh and batch placement
  checkpointing  orbax checkpoints for resuming and for the best model
  trainer        train_and_evaluate(config, workdir), the main job
  inference      restore a workdir's best model, evaluate, predict
  metrics, writer, plotting
                 scikit-learn-equal metrics, JSONL/TensorBoard logs, PNG plots

Submodules are imported on use, so `import fashion_msa.train.steps` does not
load the input pipeline.
"""
