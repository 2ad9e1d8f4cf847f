"""Pictures of label maps: palette colouring, overlays on the image with a legend, and image | gt | pred grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Pixels whose label is outside the palette (the ignore index 255, "unsure" predictions) get VOC's void colour.
IGNORE_COLOR = (224, 224, 192)
MIN_PANEL_HEIGHT = 256
_FONT_SIZE = 14
_PAD = 4


def default_palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC colour map (bits of the class id interleaved into R, G, B): np.uint8 (K, 3)."""
    ids = np.arange(num_classes)
    palette = np.zeros((num_classes, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Colour a label map. ``labels``: integer (H, W); ``palette``: uint8 (K, 3).
    Returns uint8 (H, W, 3); labels outside [0, K) get ``IGNORE_COLOR``."""
    labels = np.asarray(labels).astype(np.int64)
    table = np.vstack([np.asarray(palette, dtype=np.uint8), np.array(IGNORE_COLOR, dtype=np.uint8)])
    k = len(palette)
    return table[np.where((labels >= 0) & (labels < k), labels, k)]


def overlay(image: np.ndarray | Image.Image, labels: np.ndarray, class_names: Sequence[str],
            palette: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image tinted by its label colours, with a legend of the classes present on the right.

    ``image``: uint8 (H, W, 3) RGB or a PIL image of the same size as ``labels`` (integer (H, W)); ``alpha`` in
    [0, 1] is the weight of the label colour. Pixels with labels outside [0, K) stay untinted.
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    labels = np.asarray(labels)
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"image is {rgb.shape[1]}x{rgb.shape[0]} but labels are {labels.shape[1]}x{labels.shape[0]}")
    valid = ((labels >= 0) & (labels < len(palette)))[..., None]
    blended = (1 - alpha) * rgb + alpha * colorize(labels, palette)
    tinted = np.where(valid, blended, rgb).round().astype(np.uint8)
    return _with_legend([Image.fromarray(tinted)], [None], _present(labels, len(palette)), class_names, palette)


def comparison_grid(image: np.ndarray | None, gt: np.ndarray, pred: np.ndarray, class_names: Sequence[str],
                    palette: np.ndarray, reference: str = "ground truth") -> Image.Image:
    """Panels ``image | ground truth | prediction`` (the image panel is left out when ``image`` is None; the
    middle one titled ``reference``) under titles, with one legend of the classes in either map. Arrays as in
    ``overlay``; panels lower than ``MIN_PANEL_HEIGHT`` are enlarged by a whole factor (nearest neighbour, so
    label pixels stay sharp)."""
    panels = [Image.fromarray(colorize(gt, palette)), Image.fromarray(colorize(pred, palette))]
    titles = [reference, "prediction"]
    if image is not None:
        panels.insert(0, Image.fromarray(np.asarray(image, dtype=np.uint8)))
        titles.insert(0, "image")
    scale = -(-MIN_PANEL_HEIGHT // max(p.height for p in panels))  # ceil
    if scale > 1:
        panels = [p.resize((p.width * scale, p.height * scale), Image.Resampling.NEAREST) for p in panels]
    classes = sorted(set(_present(gt, len(palette))) | set(_present(pred, len(palette))))
    return _with_legend(panels, titles, classes, class_names, palette)


def _present(labels: np.ndarray, num_classes: int) -> list[int]:
    ids = np.unique(np.asarray(labels))
    return [int(i) for i in ids if 0 <= i < num_classes]


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=_FONT_SIZE)


def _with_legend(panels: list[Image.Image], titles: list[str | None], class_ids: list[int],
                 class_names: Sequence[str], palette: np.ndarray) -> Image.Image:
    """Panels side by side (titles above when given), then a legend column: one swatch and name per class."""
    font = _font()
    title_h = _FONT_SIZE + 2 * _PAD if any(titles) else 0
    row_h = _FONT_SIZE + _PAD
    legend_w = 2 * _PAD + row_h + max((int(font.getlength(class_names[c])) for c in class_ids), default=0)
    panels_w = sum(p.width for p in panels) + _PAD * (len(panels) - 1)
    height = max(title_h + max(p.height for p in panels), _PAD + row_h * len(class_ids))
    canvas = Image.new("RGB", (panels_w + _PAD + legend_w, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for panel, title in zip(panels, titles):
        if title:
            draw.text((x + _PAD, _PAD), title, fill="black", font=font)
        canvas.paste(panel, (x, title_h))
        x += panel.width + _PAD
    for row, c in enumerate(class_ids):
        y = _PAD + row * row_h
        draw.rectangle([x, y, x + _FONT_SIZE, y + _FONT_SIZE], fill=tuple(int(v) for v in palette[c]), outline="black")
        draw.text((x + row_h + _PAD, y), class_names[c], fill="black", font=font)
    return canvas
