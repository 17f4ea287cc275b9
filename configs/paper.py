r"""The paper's setting: FashionSenti posts, CLIP ViT-B/32 from a checkpoint directory.

Zhao et al. (COLING 2025) train CLIP ViT-B/32 with the fusion network and the
self-adaptive adapter on the FashionSenti release (Yuan and Lam, 2022). The
optimizer settings are the library's defaults: AdamW, weight decay 0.01,
learning rate 1e-5 for the CLIP towers and 5e-4 for the heads, warm-up then
cosine decay, gradient clipping at 1.0, batch 32, 2 pre-training and 10
fine-tuning epochs.

Launch (CLIP weights and the FashionSenti release must be on local disk):

  python -m launch.train --config=configs/paper.py --workdir=/tmp/paper \
      --config.data.input_dir=/path/to/fashion_senti \
      --config.data.pseudo_dir=/path/to/pseudo \
      --config.model.clip.checkpoint=/path/to/clip-vit-base-patch32

An optional argument selects an ablation (see configs/ablations.py), e.g.
`--config=configs/paper.py:no_adapter` or `--config=configs/paper.py:T+I`.
"""

import ml_collections

from configs import ablations


def get_config(ablation: str | None = None) -> ml_collections.ConfigDict:
    """Return the paper configuration, with an optional ablation applied."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # seeds parameter init, shuffling, pairing and dropout

    # Dataset.
    config.data = ml_collections.ConfigDict()
    config.data.source = (
        "fashion_senti"  # manifest | fashion_senti | mvsa_single | synthetic
    )
    config.data.input_dir = ""  # raw posts for the importer
    config.data.pseudo_dir = ""  # pseudo descriptions and images; "" = no pseudo data
    config.data.data_dir = ""  # built TFDS dataset; "" = WORKDIR/data
    config.data.source_options = ml_collections.ConfigDict()  # importer keyword options
    config.data.strict = (
        False  # True: a skipped post fails the build instead of counting
    )
    config.data.num_workers = 0  # grain worker processes for decoding (0 = in process)
    config.data.selection_split = (
        "val"  # split whose macro-F1 picks the best checkpoint
    )
    config.data.test_split = "test"  # split reported at the end; "" = none

    # Model.
    config.model = ml_collections.ConfigDict()
    config.model.clip = ml_collections.ConfigDict()
    config.model.clip.preset = "vit-b-32"  # tower shapes when no checkpoint is set
    config.model.clip.checkpoint = ""  # Hugging Face CLIP directory; "" = random towers
    config.model.clip.dtype = "float32"  # tower compute dtype: float32 | bfloat16
    config.model.clip.scan_layers = True  # nn.scan over layers: faster compilation
    config.model.normalize_embeddings = True  # L2-normalise the CLIP embeddings
    config.model.hidden_dim = 512  # hidden width of every fusion MLP
    config.model.adapter_hidden_dim = 512  # hidden width inside the adapter
    config.model.dropout_rate = 0.1  # dropout in the fusion MLPs and the adapter
    config.model.share_image_fusion = True  # one Fusion_img for original and pseudo
    config.model.use_adapter = True  # False: Sim = 1 (the -Adapter ablation)
    config.model.pretrain_adapter = True  # False: skip adapter pre-training
    config.model.fusion = "paper"  # paper | concat | add | attention
    # Features fused by the baseline heads (comma-separated); "paper" needs all five.
    config.model.modalities = "text,image,attributes,pseudo_image,pseudo_attributes"
    config.model.attention_num_heads = 4  # heads of the attention baseline

    # Training.
    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 32  # global batch, split over all devices
    config.train.eval_batch_size = 64  # global batch for evaluation and prediction
    config.train.pretrain_epochs = 2  # adapter pre-training epochs (stage 1)
    config.train.finetune_epochs = 10  # fine-tuning epochs (stage 2)
    config.train.eval_every_epochs = 1  # validate every this many fine-tuning epochs
    # Token lengths that batches trim their trailing text padding to, e.g.
    # (16, 32, 77); exact, because text attention is causal. () keeps 77.
    config.train.text_length_buckets = ()
    # Keep the CLIP towers fixed: encode every post once, cache the embeddings in
    # WORKDIR/embedding_cache, and train only the fusion, adapter and classifier.
    config.train.freeze_towers = False
    # Folder of those embeddings; "" = WORKDIR/embedding_cache. Runs of a sweep can
    # share one: files are named by a digest of towers, tokenizer and data.
    config.train.embedding_cache_dir = ""

    # Learning rate.
    config.train.tower_learning_rate = 1e-5  # peak rate of the CLIP towers
    config.train.head_learning_rate = (
        5e-4  # peak rate of the fusion, adapter, classifier
    )
    config.train.warmup_fraction = 0.1  # fraction of each stage's steps in warm-up
    config.train.weight_decay = 0.01  # AdamW decoupled weight decay
    config.train.grad_clip_norm = 1.0  # maximum global gradient norm; 0 = no clipping

    # Logging and checkpoints.
    config.train.log_every_steps = 20  # steps between logged training metrics
    config.train.checkpoint_every_steps = 500  # steps between state checkpoints
    config.train.max_checkpoints_to_keep = 2  # newest state checkpoints kept for resume
    config.train.async_checkpointing = True  # write checkpoints in a background thread
    config.train.progress_bar = True  # tqdm bars for the training and evaluation loops

    return ablations.apply(config, ablation)
