"""A synthetic captioned world: coloured shapes on noisy backgrounds with exact label maps and captions.

It stands in for the image-text data and the segmentation benchmarks that cannot be downloaded: the shipped
tiny CLIP is trained on its captions, and DenseCLIP is evaluated on its label maps. Every scene is a pure
function of ``(seed, index)``, so the same seed gives the same bytes on every machine.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from denseclip.shards import sanitize_key, write_shard

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 50),
    "blue": (35, 70, 215),
    "yellow": (230, 210, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
BACKGROUND_NAMES: tuple[str, ...] = ("background", "plain background")
# Label ids: 0 = background, then colour-major "{colour} {shape}" (1 = red circle ... 16 = yellow star).
CLASS_NAMES: tuple[str, ...] = (BACKGROUND_NAMES[0],) + tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
# How captions wrap the list of objects ("a red circle and a blue star"); the prompt templates in
# data/templates/synthetic.txt are these frames around a single "a {}".
CAPTION_FRAMES: tuple[str, ...] = ("{}.", "there is {}.", "a picture of {}.", "a photo of {}.", "a scene with {}.")

EMPTY_FRACTION = 0.1
# The world the shipped tiny CLIP was trained on (pipelines/train_tiny_clip.py); held-out sets must avoid it.
TINY_CLIP_WORLD_SEED = 20220
MAX_OBJECTS = 3
MIN_VISIBLE_FRACTION = 0.4  # an occluded object keeps at least this share of its own pixels
RADIUS_RANGE = (0.1, 0.25)  # object radius, as a fraction of the scene's side
_PLACEMENT_TRIES = 20


@dataclass
class Scene:
    """One rendered scene.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        labels: ``(H, W)`` uint8 class ids into :data:`CLASS_NAMES` (0 = background); in the COCO-Stuff world
            (:mod:`denseclip.synthetic_coco_stuff`) raw COCO-Stuff ids, 255 unlabelled.
        caption: names exactly the visible objects, in random order.
        objects: one dict per visible object (``class``, ``label``, ``colour``, ``shape``, ``center``,
            ``radius``, ``angle``, ``pixels``), in drawing order.
    """

    image: np.ndarray
    labels: np.ndarray
    caption: str
    objects: list[dict]


def _canvas(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of a square ``size`` or of a ``(height, width)`` pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def grey_background(rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
    """``(H, W, 3)`` float: blocky low-saturation noise, so no background pixel looks like an object colour.
    ``size``: the side of a square, or ``(H, W)`` (square blocks, ``cells`` of them across the short side)."""
    height, width = _canvas(size)
    cells = int(rng.integers(3, 17))
    block = min(height, width) // cells + 1
    rows, cols = max(cells, -(-height // block)), max(cells, -(-width // block))
    grey = rng.uniform(50, 200, size=(rows, cols, 1))
    tint = rng.uniform(-1, 1, size=3) * rng.uniform(0, 18)
    blocks = grey + tint + rng.normal(0, 10, size=(rows, cols, 3))
    image = np.kron(blocks, np.ones((block, block, 1)))[:height, :width]
    return image + rng.normal(0, 8, size=image.shape)


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    corners = {"square": 4, "triangle": 3, "star": 10, "pentagon": 5, "hexagon": 6}[shape]
    radii = np.full(corners, radius)
    if shape == "star":
        radii[1::2] = 0.42 * radius
    theta = angle + 2 * np.pi * np.arange(corners) / corners
    return list(zip(cx + radii * np.cos(theta), cy + radii * np.sin(theta)))


def _shape_mask(shape: str, size: int | tuple[int, int], cx: float, cy: float, radius: float,
                angle: float) -> np.ndarray:
    """``(H, W)`` bool: ``shape`` centred at ``(cx, cy)`` on a canvas of ``size`` (a side or ``(H, W)``)."""
    height, width = _canvas(size)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


def list_caption(rng: np.random.Generator, names: list[str], frames: tuple[str, ...] = CAPTION_FRAMES,
             article: str = "a ") -> str:
    """``names`` (a background name when empty) in random order, each after ``article``, listed in a random frame:
    "there is a red circle and a blue star."."""
    phrases = [f"{article}{name}" for name in names] if names else [f"{article}{rng.choice(BACKGROUND_NAMES)}"]
    phrases = [phrases[i] for i in rng.permutation(len(phrases))]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return str(rng.choice(frames)).format(listed)


def place_object(rng: np.random.Generator, obj: dict, size: int | tuple[int, int],
                 radius_range: tuple[float, float], placed: list[tuple[dict, np.ndarray]]) -> np.ndarray | None:
    """Draw ``obj["shape"]`` on top of the ``placed`` objects (``(object, (H, W) bool visible mask)`` pairs), so
    that each keeps :data:`MIN_VISIBLE_FRACTION` of its pixels; None after :data:`_PLACEMENT_TRIES` failed tries.

    ``radius_range``: the radius as a fraction of the canvas' short side. On success ``obj`` gains ``center``,
    ``radius``, ``angle`` and ``pixels`` (its whole area), the earlier masks lose its pixels, ``placed`` gains
    ``(obj, mask)`` and its ``(H, W)`` bool mask is returned.
    """
    height, width = _canvas(size)
    for _ in range(_PLACEMENT_TRIES):
        radius = rng.uniform(*radius_range) * min(height, width)
        cx, cy = rng.uniform(0.5 * radius, np.array([width, height]) - 0.5 * radius)
        angle = rng.uniform(0, 2 * np.pi)
        mask = _shape_mask(obj["shape"], size, cx, cy, radius, angle)
        area = int(mask.sum())
        # Drawing this object on top must leave every earlier object visible enough.
        if area and all((own & ~mask).sum() >= MIN_VISIBLE_FRACTION * other["pixels"] for other, own in placed):
            break
    else:
        return None
    placed[:] = [(other, own & ~mask) for other, own in placed]
    obj.update({"center": [round(float(cx), 2), round(float(cy), 2)], "radius": round(float(radius), 2),
                "angle": round(float(angle), 4), "pixels": area})
    placed.append((obj, mask))
    return mask


def visible_objects(placed: list[tuple[dict, np.ndarray]]) -> list[dict]:
    """The placed objects in drawing order, each ``pixels`` now the count of its visible pixels."""
    for obj, own in placed:
        obj["pixels"] = int(own.sum())
    return [obj for obj, _ in placed]


def render_scene(seed: int, index: int, size: int = 128) -> Scene:
    """Render scene ``index`` of the world with ``seed``: 0 to 3 distinct shape-colour objects, possibly occluded."""
    if size < 32:
        raise ValueError(f"scene size {size} is too small: use at least 32 pixels")
    rng = np.random.default_rng([seed, index])
    image = grey_background(rng, size)
    labels = np.zeros((size, size), dtype=np.uint8)
    count = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, MAX_OBJECTS + 1))
    classes = rng.choice(len(CLASS_NAMES) - 1, size=count, replace=False) + 1
    placed: list[tuple[dict, np.ndarray]] = []
    for label in classes:
        colour, shape = CLASS_NAMES[label].split(" ")
        obj = {"class": CLASS_NAMES[label], "label": int(label), "colour": colour, "shape": shape}
        mask = place_object(rng, obj, size, RADIUS_RANGE, placed)
        if mask is None:
            continue
        fill = np.asarray(COLOURS[colour], dtype=float) + rng.uniform(-25, 25, size=3)
        image[mask] = fill + rng.normal(0, 6, size=(obj["pixels"], 3))
        labels[mask] = label
    objects = visible_objects(placed)
    caption = list_caption(rng, [obj["class"] for obj in objects])
    return Scene(np.clip(image, 0, 255).round().astype(np.uint8), labels, caption, objects)


def render_dataset(seed: int, n: int, size: int = 128) -> Iterator[Scene]:
    """Scenes ``0 .. n-1`` of the world with ``seed``."""
    for index in range(n):
        yield render_scene(seed, index, size)


def scene_sample(scene: Scene, key: str, seed: int, index: int) -> dict:
    """One WebDataset sample (``jpg``, ``seg.png``, ``txt``, ``json``) for :func:`denseclip.shards.write_shard`."""
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(scene.image).save(jpg, format="JPEG", quality=95, subsampling=0)
    Image.fromarray(scene.labels, mode="L").save(png, format="PNG")
    meta = {"seed": seed, "index": index, "size": scene.labels.shape[0], "caption": scene.caption,
            "objects": scene.objects}
    return {"__key__": sanitize_key(key), "jpg": jpg.getvalue(), "seg.png": png.getvalue(),
            "txt": scene.caption, "json": json.dumps(meta, sort_keys=True)}


def write_shards(seed: int, n: int, out: str, shard_size: int = 1000, size: int = 128) -> list[str]:
    """Render ``n`` scenes into ``out/shard-000000.tar ...`` (local path or fsspec URL); returns the shard URLs."""
    if n < 1 or shard_size < 1:
        raise ValueError(f"need n >= 1 and shard_size >= 1, got n={n}, shard_size={shard_size}")
    urls = []
    for start in range(0, n, shard_size):
        url = posixpath.join(out.rstrip("/"), f"shard-{start // shard_size:06d}.tar")
        samples = (scene_sample(render_scene(seed, i, size), f"synthetic/s{seed}/{i:06d}", seed, i)
                   for i in range(start, min(n, start + shard_size)))
        write_shard(url, samples)
        urls.append(url)
    return urls


def write_images(seed: int, n: int, out: str, size: int = 128) -> list[Path]:
    """Render ``n`` scenes as plain JPEG files ``out/scene-000000.jpg ...`` (a local folder, like a folder of
    photos: no labels, ready for ``pipelines/prepare.py --dataset folder``); returns the paths."""
    if n < 1:
        raise ValueError(f"need n >= 1, got n={n}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n):
        path = folder / f"scene-{index:06d}.jpg"
        path.write_bytes(scene_sample(render_scene(seed, index, size), path.stem, seed, index)["jpg"])
        paths.append(path)
    return paths
