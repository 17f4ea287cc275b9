"""Ablations of Zhao et al. (COLING 2025, tables 3-5), each one config switch.

Pass the name after the config file, e.g. `--config=configs/demo.py:no_adapter`:

  full            the complete model (the default)
  no_pretraining  skip adapter pre-training (table 4, "-PreTraining")
  no_adapter      Sim = 1, so no adapter and no pre-training (table 4, "-Adapter")
  concat, add, attention
                  a baseline head over all five modality features (table 3)
  T, I, A, T+I, T+A, I+A, I+T+A, I+T+A+Ip, I+T+A+Ap, I+T+A+Ip+Ap, ...
                  a modality subset fused by concatenation (table 5); T text,
                  I image, A attributes, Ip pseudo image, Ap pseudo attributes
  text_only       the same as T

Pseudo-image generators (table/figure 5) are data, not model switches: point
`config.data.pseudo_dir` at the folder a generator wrote.
"""

import ml_collections

MODALITY_CODES = {
    "T": "text",
    "I": "image",
    "A": "attributes",
    "Ip": "pseudo_image",
    "Ap": "pseudo_attributes",
}
FUSION_BASELINES = ("concat", "add", "attention")


def apply(
    config: ml_collections.ConfigDict, ablation: str | None
) -> ml_collections.ConfigDict:
    """Return `config` with the named ablation applied (in place).

    Raises:
      ValueError: an unknown ablation name or modality code.
    """
    if ablation in (None, "", "full"):
        return config
    model = config.model
    if ablation == "no_pretraining":
        model.pretrain_adapter = False
    elif ablation == "no_adapter":
        model.use_adapter = False
        model.pretrain_adapter = False
    elif ablation in FUSION_BASELINES:
        model.fusion = ablation
    else:
        codes = ["T"] if ablation == "text_only" else ablation.split("+")
        unknown = [c for c in codes if c not in MODALITY_CODES]
        if unknown:
            raise ValueError(
                f"unknown ablation {ablation!r}: expected full, no_pretraining, "
                f"no_adapter, {', '.join(FUSION_BASELINES)}, text_only, or modality "
                f"codes joined by '+' from {sorted(MODALITY_CODES)}"
            )
        model.fusion = "concat"
        model.modalities = ",".join(MODALITY_CODES[c] for c in codes)
    return config
