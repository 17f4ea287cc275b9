"""fashion_msa: multimodal sentiment analysis of fashion posts in JAX and Flax.

Subpackages:
  clip     Flax CLIP towers, checkpoint loading, tokenizer, image preprocessing.
  data     TFDS builder, importers and the grain input pipeline.
  model    The fusion model with the self-adaptive adapter.
  pseudo   LLM and Stable Diffusion pseudo-data generation.
  train    Jitted train and eval steps, checkpoints, metrics.
"""

__version__ = "0.1.0"
