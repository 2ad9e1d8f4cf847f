"""Safe image decoding shared by every stage: bytes in, RGB uint8 or a single-channel label map out.

Anything unusable (empty, truncated, not an image, over the pixel limit) raises :class:`ImageDecodeError`
naming the sample, so a pipeline can record it and go on. EXIF orientation is not applied: label maps are
aligned with the stored pixel grid, and every stage decodes through here, so images and masks stay aligned.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# Larger images are refused before their pixels are decoded (decompression bombs): 2.4x an 8K x 4K photo.
# Pillow refuses anything over 2 x Image.MAX_IMAGE_PIXELS itself, so a higher limit has no effect.
MAX_PIXELS = 80_000_000
JPEG_FORMATS = ("JPEG", "MPO")
# The containers an image may come in, as Pillow's decoders are named (a multi-picture JPEG opens as JPEG and is
# then named MPO): untrusted bytes reach only these decoders. IMAGE_FORMATS are the labeller's (pipelines/label.py
# reads jpg, jpeg, png, webp, bmp, tif and tiff members); SOURCE_FORMATS what pipelines/prepare.py converts once
# into shards; label maps are PNGs.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
SOURCE_FORMATS = (*IMAGE_FORMATS, "GIF", "PPM")
LABEL_MAP_FORMATS = ("PNG",)
SAMPLE_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
_ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as image viewers do


class ImageDecodeError(ValueError):
    """An image or label map that cannot be used; ``key`` names the sample, ``reason`` says why."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key or '<image>'}: {reason}")
        self.key = key
        self.reason = reason


@dataclass
class DecodedImage:
    """``pixels``: uint8 (H, W, 3) RGB; ``format``: the container as Pillow names it ("JPEG", "PNG", ...);
    ``mode``: the stored pixel mode before conversion ("RGB", "CMYK", "I;16", "P", "RGBA", ...)."""

    pixels: np.ndarray
    format: str
    mode: str


def _open(data: bytes, key: str, max_pixels: int, formats: tuple[str, ...]) -> Image.Image:
    """Open and fully decode ``data`` as one of ``formats``, refusing empty, oversized and truncated input."""
    if not data:
        raise ImageDecodeError(key, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # The explicit pixel limit below replaces Pillow's global bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.init()  # a list of formats is looked up among the plugins loaded (at first only a few)
            image = Image.open(io.BytesIO(data), formats=formats)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    key, f"decompression bomb: {width}x{height} = {width * height} pixels > limit {max_pixels}")
            image.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(key, f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(key, f"not an image in an accepted format ({', '.join(formats)}; {len(data)} bytes)"
                               ) from exc
    except Exception as exc:  # Pillow signals bad data with many exception types
        raise ImageDecodeError(key, f"unreadable image ({len(data)} bytes): {type(exc).__name__}: {exc}") from exc
    return image


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16/32-bit grey: keep the top 8 of 16 bits rather than clipping at 255.
        grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 255).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
        return np.asarray(Image.alpha_composite(canvas, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def read_image(data: bytes, key: str = "", max_pixels: int = MAX_PIXELS,
               formats: tuple[str, ...] = IMAGE_FORMATS) -> DecodedImage:
    """Decode image bytes in one of ``formats`` to RGB, converting CMYK, 16-bit, palette, grey and alpha images
    (alpha on white)."""
    image = _open(data, key, max_pixels, formats)
    try:
        pixels = _to_rgb(image)
    except Exception as exc:  # an exotic mode Pillow cannot convert
        raise ImageDecodeError(key, f"cannot convert pixel mode {image.mode} to RGB: {exc}") from exc
    return DecodedImage(np.ascontiguousarray(pixels, dtype=np.uint8), image.format or "", image.mode)


def decode_image(data: bytes, key: str = "", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image bytes -> uint8 (H, W, 3) RGB; raises :class:`ImageDecodeError` (key, reason) on bad input."""
    return read_image(data, key, max_pixels).pixels


def is_plain_jpeg(data: bytes, key: str = "", max_pixels: int = MAX_PIXELS) -> bool:
    """Whether ``data`` is an RGB or grey JPEG of at most ``max_pixels`` (checked from its header, without decoding
    it), which a JPEG decoder other than Pillow (``torchvision.io.decode_jpeg`` on a GPU) can take instead.
    Raises :class:`ImageDecodeError` for an oversized image; anything else that is no such JPEG gives False."""
    if not data.startswith(b"\xff\xd8\xff"):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=("JPEG",))
            width, height, mode, fmt = *image.size, image.mode, image.format
    except Exception:  # noqa: BLE001 - Pillow signals bad data in many ways; decode_image will name it
        return False
    if width * height > max_pixels:
        raise ImageDecodeError(key, f"decompression bomb: {width}x{height} = {width * height} pixels > limit {max_pixels}")
    return fmt == "JPEG" and mode in ("RGB", "L")


def as_rgb_array(image: np.ndarray | Image.Image | str | os.PathLike) -> np.ndarray:
    """What people hold as an image -> what every labeller takes, an ``(H, W, 3)`` uint8 RGB array: a path is read
    and decoded (:func:`decode_image`: the formats the labeller accepts; :class:`ImageDecodeError` names it), a PIL
    image converted as a decoded file would be (CMYK, palette, 16-bit, alpha), an array passed through."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return decode_image(f.read(), key=str(image))
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    return image


def check_rgb_image(image: np.ndarray) -> None:
    """Raise ValueError unless ``image`` is what every labeller takes: a non-empty uint8 ``(H, W, 3)`` RGB
    array."""
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
            and image.size):
        shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"expected a non-empty (H, W, 3) uint8 RGB image, got {shape} {dtype}")


def decode_label_map(data: bytes, key: str = "", max_pixels: int = MAX_PIXELS, wide: bool = False) -> np.ndarray:
    """A single-channel label map (palette "P" or grey "L" PNG: the stored index is the label) -> uint8 (H, W);
    with ``wide``, 16-bit grey PNGs too -> uint16 (H, W) (vocabularies of more than 255 classes).

    RGB-coloured maps are refused: their colours would need a palette lookup that is ambiguous in general.
    """
    image = _open(data, key, max_pixels, LABEL_MAP_FORMATS)
    if wide and image.mode in ("I;16", "I;16B", "I"):
        return np.array(image).astype(np.uint16)
    if image.mode not in ("P", "L"):
        raise ImageDecodeError(key, f"label map must be a single-channel palette or grey PNG, got mode {image.mode}")
    return np.array(image, dtype=np.uint8)


def encode_png(array: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """uint8 (H, W) -> single-channel PNG bytes (mode "P" with ``palette`` uint8 (K<=256, 3), else "L")."""
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    if palette is not None:
        image.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())  # "L" becomes "P", same indices
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def encode_rgb(pixels: np.ndarray) -> bytes:
    """uint8 (H, W, 3) RGB -> lossless PNG bytes (the one-time conversion of non-JPEG sources)."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def decode_sample_image(sample: dict, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image of a WebDataset sample (its ``jpg``, ``jpeg``, ``png`` or ``webp`` member) -> uint8 (H, W, 3)."""
    key = sample.get("__key__", "")
    for ext in SAMPLE_IMAGE_MEMBERS:
        if ext in sample:
            return decode_image(sample[ext], key, max_pixels)
    raise ImageDecodeError(key, f"sample has no image member (looked for {', '.join(SAMPLE_IMAGE_MEMBERS)})")
