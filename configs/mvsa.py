r"""MVSA-Single tweets (text + image, no attributes), tiny random CLIP.

MVSA-Single (Niu et al., MMM 2016) has no fashion attributes: every attribute
string is empty. Without a pseudo-data folder no post has pseudo data, so the
model masks the pseudo branch (F_P' = 0) and adapter pre-training is skipped.
The shared copy has train and val splits only, so the best checkpoint is
chosen on val and val is also the reported split. That number is optimistic.

No pretrained CLIP can be downloaded here, so the towers are the "tiny" preset,
randomly initialised. With real weights, set
`--config.model.clip.checkpoint=/path/to/clip-vit-base-patch32` and the paper's
learning rates (configs/paper.py).

  python -m launch.train --config=configs/mvsa.py --workdir=/tmp/fashion_msa_mvsa \
      --config.data.input_dir=/path/to/mvsa_single
"""

import pathlib

import ml_collections

from configs import ablations, paper

# The shared data folder sits beside the repository.
_DEFAULT_INPUT_DIR = (
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mvsa_single"
)


def get_config(ablation: str | None = None) -> ml_collections.ConfigDict:
    """Return the MVSA-Single configuration, with an optional ablation applied."""
    config = paper.get_config()

    # Dataset.
    config.data.source = "mvsa_single"
    config.data.input_dir = str(_DEFAULT_INPUT_DIR)
    config.data.pseudo_dir = (
        ""  # generated pseudo data, if any (launch.generate_pseudo)
    )
    config.data.selection_split = "val"
    config.data.test_split = ""  # the shared copy has no test posts

    # Model.
    config.model.clip.preset = "tiny"
    config.model.clip.checkpoint = ""
    config.model.clip.scan_layers = False
    config.model.hidden_dim = 128
    config.model.adapter_hidden_dim = 128
    config.model.dropout_rate = 0.2  # 2,706 training posts: regularise a little more

    # Training.
    config.train.batch_size = 32
    config.train.eval_batch_size = 128
    config.train.pretrain_epochs = 2  # runs only when pseudo data is configured
    config.train.finetune_epochs = 8
    config.train.eval_every_epochs = 1

    # Learning rate. Random towers need larger steps than pretrained CLIP.
    config.train.tower_learning_rate = 5e-4
    config.train.head_learning_rate = 1e-3
    config.train.warmup_fraction = 0.1

    # Logging and checkpoints.
    config.train.log_every_steps = 28
    config.train.checkpoint_every_steps = 200

    return ablations.apply(config, ablation)
