"""Image checks run while building: every stored image must decode for training."""

import io
import pathlib
import warnings

from PIL import Image

from fashion_msa.clip.image_processing import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_image,
)
from fashion_msa.data.posts import SkipReason

__all__ = ["DEFAULT_MAX_PIXELS", "BadImageError", "read_image"]


class BadImageError(ValueError):
    """Raised by `read_image`; `reason` is the `SkipReason` for the report."""

    def __init__(self, reason: SkipReason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _pixel_count(data: bytes, name: str) -> int | None:
    """Return width * height from the image header, or None when it has none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.width * image.height
    except Image.DecompressionBombError as error:
        # Pillow raises this for images over twice Image.MAX_IMAGE_PIXELS.
        raise BadImageError(SkipReason.IMAGE_TOO_LARGE, f"{name}: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        return None


def read_image(
    path: pathlib.Path, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> bytes:
    """Return the encoded bytes of an image file after checking that it decodes.

    The full image is decoded (as `fashion_msa.clip.image_processing.decode_image`
    does for training), so truncated files are caught here and not mid-training.

    Raises:
      BadImageError: with reason missing_image, empty_image, image_too_large
        (more than `max_pixels` pixels, read from the header before decoding)
        or unreadable_image (not an image, truncated or corrupt).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadImageError(SkipReason.MISSING_IMAGE, f"{path} not found") from None
    except IsADirectoryError:
        raise BadImageError(
            SkipReason.MISSING_IMAGE, f"{path} is a directory"
        ) from None
    if not data:
        raise BadImageError(SkipReason.EMPTY_IMAGE, f"{path.name} has zero bytes")

    pixels = _pixel_count(data, path.name)
    if pixels is not None and max_pixels is not None and pixels > max_pixels:
        raise BadImageError(
            SkipReason.IMAGE_TOO_LARGE,
            f"{path.name} has {pixels} pixels, more than max_pixels={max_pixels}",
        )
    try:
        decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as error:
        raise BadImageError(
            SkipReason.UNREADABLE_IMAGE, f"{path.name}: {error}"
        ) from None
    return data
