r"""Demo: synthetic fashion posts with pseudo data and a tiny random CLIP, on CPU.

The synthetic source draws 600 posts (420 train, 90 val, 90 test) whose label is
carried by the text, the image or the attributes, plus LLM-style pseudo data
(see fashion_msa/data/synthetic.py). The towers are the "tiny" CLIP preset,
randomly initialised, so the learning rates are far above the pretrained
fine-tuning defaults of configs/paper.py.

  python -m launch.train --config=configs/demo.py --workdir=/tmp/fashion_msa_demo

Ablations: `--config=configs/demo.py:text_only`, `:no_adapter`, ... (see
configs/ablations.py).
"""

import ml_collections

from configs import ablations, paper


def get_config(ablation: str | None = None) -> ml_collections.ConfigDict:
    """Return the demo configuration, with an optional ablation applied."""
    config = paper.get_config()

    # Dataset.
    config.data.source = "synthetic"
    config.data.input_dir = ""  # "" = draw the posts into WORKDIR/synthetic_posts
    config.data.source_options = ml_collections.ConfigDict(
        {"num_posts": 600, "image_size": 64, "seed": 0}
    )

    # Model.
    config.model.clip.preset = "tiny"
    config.model.clip.checkpoint = ""
    config.model.clip.scan_layers = False  # two layers: nothing to gain from scan
    config.model.hidden_dim = 128
    config.model.adapter_hidden_dim = 128

    # Training.
    config.train.batch_size = 32
    config.train.eval_batch_size = 96
    config.train.pretrain_epochs = 2
    config.train.finetune_epochs = 12
    config.train.eval_every_epochs = 2

    # Learning rate. Random towers need larger steps than pretrained CLIP.
    config.train.tower_learning_rate = 1e-3
    config.train.head_learning_rate = 1e-3
    config.train.warmup_fraction = 0.1

    # Logging and checkpoints.
    config.train.log_every_steps = 13
    config.train.checkpoint_every_steps = 100
    config.train.async_checkpointing = False  # small states save in milliseconds

    return ablations.apply(config, ablation)
