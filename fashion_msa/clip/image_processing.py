"""CLIP image preprocessing in numpy and PIL: decoding, RGB conversion, resize, crop.

`preprocess_image` gives the same float32 pixels as transformers'
`CLIPImageProcessor` with its defaults, whose PIL backend is
`CLIPImageProcessorPil` in transformers 5. The shortest side is resized to
`image_size` with PIL's bicubic filter and the centre `image_size` square is
cropped. Values are scaled by 1/255 and normalised with the OpenAI CLIP mean
and standard deviation. The output is NHWC, the JAX convention, where
transformers returns NCHW.

`decode_image` turns encoded bytes into an RGB PIL image, or raises
`ImageDecodeError`. It never returns a placeholder image.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, ImageOps

# OpenAI CLIP's normalisation constants (transformers' OPENAI_CLIP_MEAN and
# OPENAI_CLIP_STD), per RGB channel.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow's own decompression-bomb warning threshold (Image.MAX_IMAGE_PIXELS in
# Pillow 13), about 89.5 megapixels: 1024 * 1024 * 1024 // 4 // 3.
DEFAULT_MAX_PIXELS = 89_478_485

# Modes whose samples are 16-bit. Pillow 13 opens 16-bit grayscale PNG and
# TIFF as "I;16*", and some decoders and older Pillow versions give "I".
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

# Exceptions Pillow raises on unreadable or corrupt data while opening or
# decoding. UnidentifiedImageError is an OSError.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    EOFError,
    ValueError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


class ImageDecodeError(ValueError):
    """Raised when bytes cannot be decoded into a usable image."""


def decode_image(
    data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode an encoded image into an RGB PIL image, upright per its EXIF orientation.

    Animated images (GIF, APNG, WebP) give their first frame. Colour modes are
    converted as `to_rgb` describes.

    Args:
      data: the encoded file (JPEG, PNG, GIF, WebP, BMP, TIFF, ...).
      max_pixels: the largest width * height accepted, checked from the header
        before any pixel is decoded. None disables this check. Pillow's own
        limit (twice `PIL.Image.MAX_IMAGE_PIXELS`) still applies on top.

    Raises:
      ImageDecodeError: the data is empty, not an image, truncated or corrupt,
        has more than `max_pixels` pixels, or has a mode without an RGB
        conversion.

    NOTE: a truncated file is only detected while Pillow's global
    `ImageFile.LOAD_TRUNCATED_IMAGES` is False, its default. When it is True,
    Pillow fills the missing part with grey instead of failing.
    """
    data = bytes(data)
    if not data:
        raise ImageDecodeError("cannot decode an image from zero bytes")

    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(
            f"image exceeds Pillow's decompression-bomb limit: {error} Raise "
            f"PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS}) if the "
            f"image is trusted"
        ) from error
    except _DECODE_ERRORS as error:
        raise ImageDecodeError(
            f"cannot identify an image format in {len(data)} bytes starting "
            f"{data[:16]!r}"
        ) from error

    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(
            f"{image.format} image has an empty size {width}x{height}"
        )
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            f"{image.format} image of {width}x{height} = {width * height} pixels "
            f"exceeds max_pixels={max_pixels}. Raise max_pixels if the image is "
            f"trusted"
        )

    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except _DECODE_ERRORS as error:
        raise ImageDecodeError(
            f"cannot decode {image.format} image of {width}x{height} "
            f"({len(data)} bytes): {error}"
        ) from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to RGB.

    - Transparency (an "A" band, as in LA, PA and RGBA, or a `transparency`
      entry for P, L and RGB images) is composited onto white. This is what
      transformers' `convert_to_rgb` does.
    - 16-bit samples (modes I;16* and I) are scaled to 8 bits as
      round(value * 255 / 65535) and the image becomes grayscale. This differs
      from Pillow's `convert("RGB")`, which clips every value above 255 to white
      and turns a typical 16-bit photograph into a blank image. Mode I values
      outside 0..65535 are clipped to that range first.
    - Every other mode (L, 1, P, CMYK, YCbCr, F, ...) goes through Pillow's
      `convert("RGB")`.

    Raises:
      ValueError: Pillow has no conversion from the image's mode to RGB.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_eight_bit(image)

    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(
    image: Image.Image | bytes,
    image_size: int = 224,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Resize, centre-crop and normalise an image as CLIPImageProcessor does.

    Args:
      image: encoded bytes (decoded with `decode_image`) or a PIL image. A PIL
        image gets the same EXIF transpose and `to_rgb` conversion as decoded
        bytes, so a file gives the same pixels either way.
      image_size: side of the square output (224 for ViT-B/32).
      max_pixels: limit on the decoded image and on the resized image before
        the crop. A very elongated image resizes to a very long strip, for
        example 1x1000 pixels to 224x224000.

    Returns:
      float32 (image_size, image_size, 3), CLIP-normalised RGB.

    Raises:
      ImageDecodeError: the bytes cannot be decoded, or the image or its
        resized form has more than `max_pixels` pixels.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = decode_image(image, max_pixels=max_pixels)
    elif isinstance(image, Image.Image):
        image = to_rgb(ImageOps.exif_transpose(image))
    else:
        raise TypeError(
            f"image must be bytes or a PIL.Image.Image, got {type(image).__name__}"
        )

    resized_width, resized_height = _resized_size(image.size, image_size)
    if max_pixels is not None and resized_width * resized_height > max_pixels:
        raise ImageDecodeError(
            f"image of {image.width}x{image.height} resizes to "
            f"{resized_width}x{resized_height} pixels before the crop, more than "
            f"max_pixels={max_pixels}, because its aspect ratio is extreme"
        )
    resized = image.resize(
        (resized_width, resized_height), resample=Image.Resampling.BICUBIC
    )
    pixels = np.asarray(resized)

    # Same offsets as transformers' center_crop: the extra row or column of an
    # odd margin goes to the bottom and right.
    top = (resized_height - image_size) // 2
    left = (resized_width - image_size) // 2
    cropped = pixels[top : top + image_size, left : left + image_size]

    # transformers rescales in float64 and casts to float32 before normalising
    # in float32. Repeating both steps gives bit-identical output.
    rescaled = (cropped.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(CLIP_MEAN, np.float32)
    std = np.asarray(CLIP_STD, np.float32)
    return (rescaled - mean) / std


def _resized_size(size: tuple[int, int], shortest_side: int) -> tuple[int, int]:
    """Return (width, height) with the shortest side set to `shortest_side`.

    The longer side is truncated, not rounded, as in transformers'
    get_resize_output_image_size. It is never shorter than `shortest_side`, so
    the centre crop never needs padding.
    """
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_side * long / short)
    if width <= height:
        return shortest_side, new_long
    return new_long, shortest_side


def _sixteen_bit_to_eight_bit(image: Image.Image) -> Image.Image:
    """Scale a 16-bit image to 8-bit L, or to LA when it has a transparent value."""
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    # Integer round-half-up of value * 255 / 65535, so 0 -> 0 and 65535 -> 255.
    gray = ((values * 255 + 32767) // 65535).astype(np.uint8)

    transparent_value = image.info.get("transparency")
    if isinstance(transparent_value, int):
        alpha = np.where(values == transparent_value, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray, alpha], axis=-1))
    return Image.fromarray(gray)
