"""Pictures of label maps: class colours, palette colouring, overlays on the image with a legend, and
image | gt | pred grids.

Colours follow the names: background is black (and left untinted in overlays) wherever it stands in the
vocabulary, a class named with a colour word ("red star") is drawn in that colour, and datasets keep their
standard palettes (``denseclip.datasets``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Pixels whose label is outside the palette (the ignore index 255, "unsure" predictions) get VOC's void colour.
IGNORE_COLOR = (224, 224, 192)
BACKGROUND_COLOR = (0, 0, 0)
BACKGROUND_NAMES = ("background",)
# Colour words and how they are drawn. Black and white classes stay apart from background and the page.
COLOR_WORDS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 170, 50), "blue": (35, 75, 220), "yellow": (235, 210, 35),
    "orange": (245, 140, 20), "purple": (130, 50, 170), "violet": (150, 90, 210), "pink": (245, 130, 190),
    "magenta": (220, 40, 200), "cyan": (40, 210, 220), "turquoise": (50, 200, 180), "teal": (20, 130, 130),
    "brown": (140, 85, 40), "beige": (220, 200, 160), "gold": (210, 170, 40), "silver": (185, 185, 195),
    "gray": (128, 128, 128), "grey": (128, 128, 128), "black": (55, 55, 55), "white": (245, 245, 245),
    "navy": (20, 30, 110), "maroon": (120, 20, 35), "olive": (120, 120, 30), "lime": (150, 230, 40),
}
# Several classes of one colour ("red circle", "red star") get shades of it: mixed towards black (< 0) or white.
_SHADES = (0.0, -0.35, 0.35, -0.6, 0.6, -0.2, 0.2, -0.75, 0.75)
UNSEEN_MARK = " (unseen)"
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


def is_background(name: str) -> bool:
    """True for the background class, however it is spelt ("background", "Background")."""
    return name.strip().lower() in BACKGROUND_NAMES


def color_word(name: str) -> str | None:
    """The first colour word in a class name (``"small red star" -> "red"``), or None."""
    return next((w for w in re.findall(r"[a-z]+", name.lower()) if w in COLOR_WORDS), None)


def class_palette(class_names: Sequence[str], base: np.ndarray | None = None) -> np.ndarray:
    """One colour per class, uint8 (K, 3): background black; a class named with a colour word in that colour
    (shades of it when several classes share the word); any other class ``base[i]`` (a dataset's standard
    palette), by default the VOC colour map from its second entry on, so no class but background is black."""
    k = len(class_names)
    palette = np.array(base[:k] if base is not None else default_palette(k + 1)[1:], dtype=np.float64)
    counts: dict[str, int] = {}
    for i, name in enumerate(class_names):
        word = color_word(name)
        if is_background(name):
            palette[i] = BACKGROUND_COLOR
        elif word is not None and base is None:
            shade = _SHADES[counts.get(word, 0) % len(_SHADES)]
            counts[word] = counts.get(word, 0) + 1
            colour = np.array(COLOR_WORDS[word], dtype=np.float64)
            palette[i] = colour + abs(shade) * ((255.0 if shade > 0 else 0.0) - colour)
    return palette.round().astype(np.uint8)


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Colour a label map. ``labels``: integer (H, W); ``palette``: uint8 (K, 3).
    Returns uint8 (H, W, 3); labels outside [0, K) get ``IGNORE_COLOR``."""
    labels = np.asarray(labels).astype(np.int64)
    table = np.vstack([np.asarray(palette, dtype=np.uint8), np.array(IGNORE_COLOR, dtype=np.uint8)])
    k = len(palette)
    return table[np.where((labels >= 0) & (labels < k), labels, k)]


def overlay(image: np.ndarray | Image.Image, labels: np.ndarray, class_names: Sequence[str],
            palette: np.ndarray, alpha: float = 0.5, unseen: Collection[str] = ()) -> Image.Image:
    """The image tinted by its label colours, with a legend of the classes present on the right (``unseen``
    class names marked there).

    ``image``: uint8 (H, W, 3) RGB or a PIL image of the same size as ``labels`` (integer (H, W)); ``alpha`` in
    [0, 1] is the weight of the label colour. Background pixels and labels outside [0, K) stay untinted.
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    labels = np.asarray(labels)
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"image is {rgb.shape[1]}x{rgb.shape[0]} but labels are {labels.shape[1]}x{labels.shape[0]}")
    tinted_ids = [i for i, name in enumerate(class_names[:len(palette)]) if not is_background(name)]
    tint = np.isin(labels, tinted_ids)[..., None]
    blended = (1 - alpha) * rgb + alpha * colorize(labels, palette)
    tinted = np.where(tint, blended, rgb).round().astype(np.uint8)
    return _with_legend([Image.fromarray(tinted)], [None], _present(labels, len(palette)), class_names, palette,
                        unseen)


def comparison_grid(image: np.ndarray | None, gt: np.ndarray, pred: np.ndarray, class_names: Sequence[str],
                    palette: np.ndarray, unseen: Collection[str] = (),
                    reference: str = "ground truth") -> Image.Image:
    """Panels ``image | ground truth | prediction`` (the image panel is left out when ``image`` is None; the
    middle one titled ``reference`` when the prediction is compared with something else); see
    ``label_panels``."""
    return label_panels(image, {reference: gt, "prediction": pred}, class_names, palette, unseen)


def label_panels(image: np.ndarray | None, maps: Mapping[str, np.ndarray], class_names: Sequence[str],
                 palette: np.ndarray, unseen: Collection[str] = ()) -> Image.Image:
    """The image (unless None), then each label map of ``maps`` (title -> integer (H, W)) side by side under
    their titles, with one legend of the classes in any map (``unseen`` class names marked). Arrays as in
    ``overlay``; panels lower than ``MIN_PANEL_HEIGHT`` are enlarged by a whole factor (nearest neighbour, so label
    pixels stay sharp)."""
    panels = [Image.fromarray(colorize(labels, palette)) for labels in maps.values()]
    titles = list(maps)
    if image is not None:
        panels.insert(0, Image.fromarray(np.asarray(image, dtype=np.uint8)))
        titles.insert(0, "image")
    scale = -(-MIN_PANEL_HEIGHT // max(p.height for p in panels))  # ceil
    if scale > 1:
        panels = [p.resize((p.width * scale, p.height * scale), Image.Resampling.NEAREST) for p in panels]
    classes = sorted(set().union(*(_present(labels, len(palette)) for labels in maps.values())))
    return _with_legend(panels, titles, classes, class_names, palette, unseen)


def _present(labels: np.ndarray, num_classes: int) -> list[int]:
    ids = np.unique(np.asarray(labels))
    return [int(i) for i in ids if 0 <= i < num_classes]


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=_FONT_SIZE)


def legend_name(name: str, unseen: Collection[str]) -> str:
    """A class as a legend names it: ``"red star (unseen)"`` for an unseen class."""
    return name + UNSEEN_MARK if name in unseen else name


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` in lines of whole words no wider than ``width`` pixels (a longer word gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def _with_legend(panels: list[Image.Image], titles: list[str | None], class_ids: list[int],
                 class_names: Sequence[str], palette: np.ndarray, unseen: Collection[str]) -> Image.Image:
    """Panels side by side (titles above when given), then a legend column: one swatch and name per class."""
    font = _font()
    names = [legend_name(class_names[c], unseen) for c in class_ids]
    row_h = _FONT_SIZE + _PAD
    wrapped = [_wrap(title, font, panel.width - 2 * _PAD) if title else [] for panel, title in zip(panels, titles)]
    title_h = max(len(lines) for lines in wrapped) * row_h + _PAD if any(titles) else 0
    legend_w = 2 * _PAD + row_h + max((int(font.getlength(name)) for name in names), default=0)
    panels_w = sum(p.width for p in panels) + _PAD * (len(panels) - 1)
    height = max(title_h + max(p.height for p in panels), _PAD + row_h * len(class_ids))
    canvas = Image.new("RGB", (panels_w + _PAD + legend_w, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for panel, lines in zip(panels, wrapped):
        for row, line in enumerate(lines):
            draw.text((x + _PAD, _PAD + row * row_h), line, fill="black", font=font)
        canvas.paste(panel, (x, title_h))
        x += panel.width + _PAD
    for row, (c, name) in enumerate(zip(class_ids, names)):
        y = _PAD + row * row_h
        draw.rectangle([x, y, x + _FONT_SIZE, y + _FONT_SIZE], fill=tuple(int(v) for v in palette[c]), outline="black")
        draw.text((x + row_h + _PAD, y), name, fill="black", font=font)
    return canvas
