"""Tests for fashion_msa.clip.image_processing against transformers' CLIPImageProcessor.

The reference is `CLIPImageProcessorPil`, the PIL backend of CLIPImageProcessor
in transformers 5. The default `CLIPImageProcessor` class there needs
torchvision, which is not installed.
"""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil

from fashion_msa.clip import image_processing

# Both sides run the same PIL resize and the same float64 rescale and float32
# normalisation, so they agree exactly. The tolerance leaves room only for
# float32 reassociation in other numpy builds.
ATOL = 1e-5

NUM_MVSA_IMAGES = 36


def reference_pixels(image: Image.Image, image_size: int = 224) -> np.ndarray:
    """Preprocess with transformers and return (image_size, image_size, 3)."""
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    pixel_values = processor(images=image, return_tensors="np")["pixel_values"]
    return pixel_values[0].transpose(1, 2, 0)


def encode(image: Image.Image, image_format: str, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_options)
    return buffer.getvalue()


def random_pixels(height: int, width: int, channels: int = 3, seed: int = 0):
    """Return smooth random uint8 pixels, (height, width, channels).

    Upsampled coarse noise survives JPEG compression recognisably, unlike
    per-pixel noise.
    """
    rng = np.random.default_rng(seed)
    coarse_shape = (max(height // 8, 1), max(width // 8, 1), channels)
    coarse = rng.integers(0, 256, coarse_shape, dtype=np.uint8)
    planes = [
        Image.fromarray(coarse[..., channel]).resize(
            (width, height), Image.Resampling.BILINEAR
        )
        for channel in range(channels)
    ]
    return np.stack([np.asarray(plane) for plane in planes], axis=-1)


def png_header(width: int, height: int) -> bytes:
    """Return the start of an 8-bit grayscale PNG: IHDR and an empty IDAT chunk.

    Pillow reads the size from these and stops before the pixel data.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return (
            struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))
        )

    fields = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", fields) + chunk(b"IDAT", b"")


def assert_matches_reference(data: bytes, image_size: int = 224) -> float:
    """Check preprocess_image against transformers on the decoded image."""
    ours = image_processing.preprocess_image(data, image_size)
    theirs = reference_pixels(image_processing.decode_image(data), image_size)

    assert ours.dtype == np.float32
    assert ours.shape == (image_size, image_size, 3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)
    return float(np.abs(ours - theirs).max())


# Real images.


def test_mvsa_images_match_clip_image_processor(mvsa_dir):
    paths = sorted(mvsa_dir.glob("data/*.jpg"))
    sample = paths[:: len(paths) // NUM_MVSA_IMAGES][:NUM_MVSA_IMAGES]

    for index, path in enumerate(sample):
        data = path.read_bytes()
        image_size = 64 if index % 6 == 0 else 224

        assert_matches_reference(data, image_size)
        # These JPEGs are RGB with no EXIF orientation, so transformers given
        # the raw file agrees too.
        ours = image_processing.preprocess_image(data, image_size)
        raw = reference_pixels(Image.open(io.BytesIO(data)), image_size)
        np.testing.assert_allclose(ours, raw, rtol=0, atol=ATOL, err_msg=path.name)


# Made edge cases.


@pytest.mark.parametrize("image_size", [224, 64])
@pytest.mark.parametrize(
    ("height", "width"),
    [
        (1, 1),
        (2, 3),
        (100, 300),
        (300, 100),
        (101, 225),
        (225, 101),
        (7, 700),
        (224, 224),
        (1000, 800),
    ],
)
def test_sizes_match_reference(height, width, image_size):
    data = encode(Image.fromarray(random_pixels(height, width)), "PNG")

    assert_matches_reference(data, image_size)


def test_mode_conversions_match_reference():
    """Modes both sides convert the same way, compared on the raw image too."""
    rgb = random_pixels(48, 40, seed=1)
    alpha = random_pixels(48, 40, channels=1, seed=2)[..., 0]
    gray = random_pixels(48, 40, channels=1, seed=3)[..., 0]
    palette = Image.fromarray(rgb).quantize(colors=16)
    cases = {
        "CMYK JPEG": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "RGBA PNG": encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG"),
        "LA PNG": encode(Image.fromarray(np.dstack([gray, alpha])), "PNG"),
        "L JPEG": encode(Image.fromarray(gray), "JPEG"),
        "1-bit PNG": encode(Image.fromarray(gray).convert("1"), "PNG"),
        "palette GIF": encode(palette, "GIF"),
        "palette GIF with transparency": encode(palette, "GIF", transparency=3),
        "palette PNG": encode(palette, "PNG"),
    }

    for name, data in cases.items():
        raw = Image.open(io.BytesIO(data))
        ours = image_processing.preprocess_image(data)
        np.testing.assert_allclose(
            ours, reference_pixels(raw), rtol=0, atol=ATOL, err_msg=name
        )
        assert_matches_reference(data)


def test_alpha_composited_on_white():
    pixels = np.zeros((2, 2, 4), np.uint8)
    pixels[0, 0] = (255, 0, 0, 255)
    pixels[0, 1] = (255, 0, 0, 0)
    pixels[1, 0] = (0, 0, 0, 128)

    decoded = np.asarray(
        image_processing.decode_image(encode(Image.fromarray(pixels), "PNG"))
    )

    assert decoded[0, 0].tolist() == [255, 0, 0]
    assert decoded[0, 1].tolist() == [255, 255, 255]
    assert decoded[1, 0].tolist() == [127, 127, 127]


def test_palette_transparency_composited_on_white():
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    palette.putpalette([10, 20, 30, 200, 100, 50])

    decoded = np.asarray(
        image_processing.decode_image(encode(palette, "GIF", transparency=0))
    )

    assert decoded[0, 0].tolist() == [255, 255, 255]
    assert decoded[0, 1].tolist() == [200, 100, 50]


def test_sixteen_bit_grayscale_scaled_to_eight_bits():
    values = np.linspace(0, 65535, 48 * 40).reshape(48, 40).astype(np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    expected_gray = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5)

    decoded = np.asarray(image_processing.decode_image(data))

    assert decoded.shape == (48, 40, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], expected_gray)
    assert_matches_reference(data)


def test_sixteen_bit_transparent_value():
    values = np.full((4, 4), 40000, np.uint16)
    values[0, 0] = 7
    data = encode(Image.fromarray(values), "PNG", transparency=7)

    decoded = np.asarray(image_processing.decode_image(data))

    assert decoded[0, 0].tolist() == [255, 255, 255]
    assert decoded[1, 1].tolist() == [156, 156, 156]


def test_mode_i_scaled_like_sixteen_bit():
    values = np.array([[-5, 0, 257, 65535, 70000]], np.int32)

    decoded = np.asarray(image_processing.to_rgb(Image.fromarray(values)))

    assert decoded[0, :, 0].tolist() == [0, 0, 1, 255, 255]


@pytest.mark.parametrize(
    ("orientation", "transpose"),
    [
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_270),
        (8, Image.Transpose.ROTATE_90),
        (2, Image.Transpose.FLIP_LEFT_RIGHT),
    ],
)
def test_exif_orientation_applied(orientation, transpose):
    stored = Image.fromarray(random_pixels(60, 100, seed=4))
    exif = Image.Exif()
    exif[0x0112] = orientation
    rotated_data = encode(stored, "JPEG", exif=exif.tobytes())
    upright_data = encode(stored, "JPEG")
    # The same JPEG data without the tag, turned by hand as the tag requires.
    turned = Image.open(io.BytesIO(upright_data)).convert("RGB").transpose(transpose)

    decoded = image_processing.decode_image(rotated_data)
    ours = image_processing.preprocess_image(rotated_data)
    unrotated = image_processing.preprocess_image(upright_data)

    assert decoded.size == turned.size
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(turned))
    assert np.abs(ours - unrotated).max() > 0.1
    np.testing.assert_allclose(ours, reference_pixels(turned), rtol=0, atol=ATOL)


def test_pil_input_equals_bytes_input():
    stored = Image.fromarray(random_pixels(60, 100, seed=5))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", exif=exif.tobytes())

    from_bytes = image_processing.preprocess_image(data)
    from_pil = image_processing.preprocess_image(Image.open(io.BytesIO(data)))
    from_decoded = image_processing.preprocess_image(
        image_processing.decode_image(data)
    )

    np.testing.assert_array_equal(from_pil, from_bytes)
    np.testing.assert_array_equal(from_decoded, from_bytes)


def test_first_frame_of_animated_gif():
    frames = [Image.new("RGB", (8, 8), color) for color in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])

    decoded = np.asarray(image_processing.decode_image(buffer.getvalue()))

    assert (decoded == [255, 0, 0]).all()


# Bad input.


def test_zero_bytes_raise():
    with pytest.raises(image_processing.ImageDecodeError, match="zero bytes"):
        image_processing.decode_image(b"")


def test_non_image_bytes_raise():
    with pytest.raises(image_processing.ImageDecodeError, match="cannot identify"):
        image_processing.decode_image(b"this is a tweet, not a picture")


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_truncated_file_raises(image_format):
    data = encode(Image.fromarray(random_pixels(200, 200, seed=6)), image_format)

    with pytest.raises(image_processing.ImageDecodeError, match="cannot decode"):
        image_processing.decode_image(data[: len(data) // 2])


def test_truncated_mvsa_image_raises(mvsa_dir):
    data = next(iter(sorted(mvsa_dir.glob("data/*.jpg")))).read_bytes()

    with pytest.raises(image_processing.ImageDecodeError, match="truncated"):
        image_processing.decode_image(data[: len(data) * 2 // 3])


def test_max_pixels_limit():
    data = encode(Image.fromarray(random_pixels(100, 100)), "PNG")

    with pytest.raises(image_processing.ImageDecodeError, match="max_pixels=9999"):
        image_processing.decode_image(data, max_pixels=9999)
    assert image_processing.decode_image(data, max_pixels=10000).size == (100, 100)
    assert image_processing.decode_image(data, max_pixels=None).size == (100, 100)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_header_raises():
    # 12000 x 12000 is over the default max_pixels but under twice Pillow's
    # limit, so our check raises first. 50000 x 50000 trips Pillow's own check.
    with pytest.raises(image_processing.ImageDecodeError, match="max_pixels="):
        image_processing.decode_image(png_header(12000, 12000))
    with pytest.raises(image_processing.ImageDecodeError, match="decompression-bomb"):
        image_processing.decode_image(png_header(50000, 50000), max_pixels=None)


def test_extreme_aspect_ratio_raises():
    data = encode(Image.fromarray(random_pixels(1, 5000, seed=7)), "PNG")

    with pytest.raises(image_processing.ImageDecodeError, match="aspect ratio"):
        image_processing.preprocess_image(data, max_pixels=1_000_000)


def test_rejects_other_input_types():
    with pytest.raises(TypeError, match="bytes or a PIL.Image.Image"):
        image_processing.preprocess_image(np.zeros((4, 4, 3), np.uint8))
