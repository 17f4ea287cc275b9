"""Pseudo-data generation: LLM descriptions, Stable Diffusion images, image rewrites.

Modules:
  describe     stage 1, `describe_posts`: an LLM behind any OpenAI-compatible
               endpoint writes a picture description and item attributes per
               post (streamed requests, or the Batch API through `batch`).
  render       stage 2, `render_descriptions`: diffusers Stable Diffusion turns
               the descriptions into images.
  traditional  `generate_traditional`: rotate, color and cutout rewrites of the
               post's own image, with its original attributes.
  layout       the folder layout that `fashion_msa.data` reads.

`describe` needs the `openai` package and `render` needs torch and diffusers (the
`generate` extra); neither is imported here.
"""

from fashion_msa.pseudo.layout import (
    BATCH_DIR,
    DESCRIPTIONS_FILE,
    IMAGES_DIR,
    IMAGES_LOG,
)
from fashion_msa.pseudo.report import RunSummary

__all__ = ["BATCH_DIR", "DESCRIPTIONS_FILE", "IMAGES_DIR", "IMAGES_LOG", "RunSummary"]
