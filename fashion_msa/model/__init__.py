"""The fusion model of Zhao et al. (COLING 2025) on top of Flax CLIP towers.

FashionMSA           the full model: towers, fusion, adapter, classifier
ModelConfig          head sizes and ablation switches
Fusion               concatenation followed by a two-layer MLP
SelfAdaptiveAdapter  Siamese similarity between original and pseudo features
create_model, create_params
                     build both from an ml_collections `config.model`
"""

from fashion_msa.model.adapter import SelfAdaptiveAdapter
from fashion_msa.model.factory import create_model, create_params
from fashion_msa.model.fusion import Fusion
from fashion_msa.model.msa import FashionMSA, ModelConfig

__all__ = [
    "FashionMSA",
    "Fusion",
    "ModelConfig",
    "SelfAdaptiveAdapter",
    "create_model",
    "create_params",
]
