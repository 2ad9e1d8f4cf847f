"""A COCO-Stuff-shaped synthetic world: 640x480 scenes of stuff regions and thing objects, each of 33 real COCO-Stuff
classes (the 15 unseen ones of the paper's zero-shot split among them) with a fixed visual signature, written in
COCO-Stuff 164k's own layout so that the real ``pipelines/prepare.py --dataset coco_stuff`` reads it:

    DIR/images/{split}2017/<12-digit index>.jpg
    DIR/annotations/{split}2017/<12-digit index>.png    raw COCO-Stuff ids (0-181), 255 unlabelled

It stands in for COCO-Stuff in a dress rehearsal of the real reproduction spec (``jobs/rehearse_*.yaml``), and its
captions (the real class names in the paper's prompt frames) train the shipped ``denseclip-tiny-cocostuff``. It
draws on the shapes world's machinery (:mod:`denseclip.synthetic`: object placement with occlusion, the grey
unlabelled texture, captions). Every scene is a pure function of ``(seed, split, index)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from denseclip.datasets import get_dataset, train_id_lut
from denseclip.synthetic import (
    Scene,
    grey_background,
    list_caption,
    place_object,
    scene_sample,
    visible_objects,
)
from denseclip.vocabulary import load_templates

DATASET = "coco_stuff"
SPLITS = ("train", "val")
SIZE = (480, 640)  # (H, W): COCO's most common image shape
UNLABELLED = 255
# The world the shipped denseclip-tiny-cocostuff was trained on (pipelines/train_tiny_clip.py); held-out sets avoid it.
TINY_CLIP_WORLD_SEED = 20221
UNLABELLED_FRACTION = 0.2  # share of scenes with a region no class covers (unlabelled in the annotation)
MAX_THINGS = 4
THING_RADIUS = (0.08, 0.22)  # of the short side: 38-106 pixels at 640x480
MIN_CAPTION_SHARE = 0.04  # a class names a crop's caption when it covers this share of the crop


@dataclass(frozen=True)
class Signature:
    """How a class looks: ``colour`` mixed towards ``second`` by a ``pattern`` of ``scale`` pixels (``angle``
    in degrees for stripes, ``duty`` the share of each period in ``second``); things have a ``shape``."""

    colour: tuple[int, int, int]
    second: tuple[int, int, int]
    pattern: str = "flat"  # flat, grain, patches, stripes, waves, checker, bricks, grid, rings
    scale: int = 8
    angle: float = 0.0
    duty: float = 0.5
    shape: str | None = None  # None: stuff (a region); else a shape of denseclip.synthetic


# Stuff: COCO-Stuff 164k's names as the paper's class list spells them (data/classnames/maskclip/coco_stuff171.txt).
# Unseen stuff and a seen class that resembles it share colours, so only the texture tells them apart
# (grass / playingfield / tree, river / sea, road / pavement, clouds / snow, cardboard / sand / dirt).
STUFF: dict[str, Signature] = {
    "grass": Signature((70, 150, 50), (45, 115, 35), "grain", 6),
    "tree": Signature((35, 95, 40), (85, 140, 60), "patches", 14),
    "road": Signature((75, 75, 80), (225, 205, 60), "stripes", 48, 0, 0.12),
    "river": Signature((45, 100, 175), (125, 170, 220), "waves", 20),
    "clouds": Signature((240, 240, 245), (185, 190, 205), "patches", 24),
    "playingfield": Signature((90, 180, 70), (245, 245, 245), "stripes", 64, 90, 0.1),
    "concrete wall": Signature((165, 160, 150), (130, 125, 120), "grain", 3),
    "cardboard": Signature((180, 135, 80), (145, 100, 55), "stripes", 8, 90),
    "sky": Signature((125, 175, 235), (150, 195, 245), "grain", 40),
    "sea": Signature((25, 60, 140), (60, 100, 180), "waves", 12),
    "sand": Signature((225, 205, 155), (200, 180, 130), "grain", 3),
    "snow": Signature((248, 248, 250), (220, 228, 240), "grain", 8),
    "brick wall": Signature((165, 65, 45), (205, 200, 190), "bricks", 16),
    "building": Signature((120, 125, 135), (200, 210, 225), "checker", 20),
    "dirt": Signature((125, 90, 55), (95, 65, 40), "grain", 5),
    "pavement": Signature((150, 150, 155), (105, 105, 110), "grid", 32),
}
THINGS: dict[str, Signature] = {
    "frisbee": Signature((230, 40, 40), (250, 250, 250), "rings", 14, shape="circle"),
    "skateboard": Signature((60, 60, 65), (230, 120, 30), "stripes", 10, 45, shape="square"),
    "carrot": Signature((240, 130, 30), (195, 95, 20), "stripes", 10, 0, shape="triangle"),
    "scissors": Signature((190, 195, 200), (220, 30, 60), "patches", 8, shape="star"),
    "suitcase": Signature((70, 45, 30), (150, 110, 65), "stripes", 24, 90, 0.2, shape="square"),
    "giraffe": Signature((225, 180, 90), (140, 80, 35), "patches", 12, shape="hexagon"),
    "cow": Signature((245, 245, 240), (25, 25, 25), "patches", 20, shape="pentagon"),
    "person": Signature((230, 175, 140), (60, 60, 140), "flat", shape="circle"),
    "car": Signature((200, 30, 40), (40, 40, 45), "flat", shape="square"),
    "dog": Signature((160, 110, 60), (120, 80, 40), "grain", 4, shape="pentagon"),
    "horse": Signature((95, 55, 30), (60, 35, 20), "grain", 6, shape="hexagon"),
    "elephant": Signature((130, 130, 130), (105, 105, 105), "grain", 3, shape="circle"),
    "zebra": Signature((245, 245, 245), (20, 20, 20), "stripes", 12, 60, shape="pentagon"),
    "bus": Signature((245, 200, 30), (60, 80, 110), "checker", 16, shape="square"),
    "kite": Signature((220, 40, 200), (40, 200, 220), "checker", 24, shape="triangle"),
    "banana": Signature((240, 225, 60), (125, 105, 20), "flat", shape="star"),
    "pizza": Signature((235, 170, 70), (190, 40, 30), "patches", 10, shape="circle"),
}
CLASSES: dict[str, Signature] = {**STUFF, **THINGS}


@functools.cache
def raw_ids() -> dict[str, int]:
    """Raw COCO-Stuff annotation id (0-181, the 11 unused ids skipped) of each class of the world."""
    names = get_dataset(DATASET).class_names
    raw_of_train_id = np.flatnonzero(train_id_lut(DATASET) != UNLABELLED)
    return {name: int(raw_of_train_id[names.index(name)]) for name in CLASSES}


@functools.cache
def caption_frames() -> tuple[str, ...]:
    """Captions are prompt templates around the listed names: the paper's (``denseclip85``), then the tiny models'
    default (``synthetic``), so that the tiny CLIP reads the prompts it is labelled with under either."""
    return tuple(dict.fromkeys(load_templates("denseclip85") + load_templates("synthetic")))


def _pattern(sig: Signature, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray,
             centre: tuple[float, float]) -> np.ndarray:
    """``(N,)`` float in [0, 1]: how far each pixel ``(ys[i], xs[i])`` leans to ``sig.second``."""
    s = sig.scale
    if sig.pattern in ("grain", "patches"):
        grid = rng.random((SIZE[0] // s + 2, SIZE[1] // s + 2))
        values = grid[ys // s, xs // s]
        return values if sig.pattern == "grain" else (values > 0.6).astype(float)
    if sig.pattern == "stripes":
        theta = np.deg2rad(sig.angle)
        offset = xs * np.sin(theta) + ys * np.cos(theta) + rng.uniform(0, s)
        return (offset % s < sig.duty * s).astype(float)
    if sig.pattern == "waves":
        offset = ys + 0.25 * s * np.sin(2 * np.pi * xs / (3 * s)) + rng.uniform(0, s)
        return (offset % s < sig.duty * s).astype(float)
    if sig.pattern == "checker":
        return ((xs // s + ys // s) % 2).astype(float)
    if sig.pattern == "bricks":
        row = ys // s
        return ((ys % s < 2) | ((xs + (row % 2) * s) % (2 * s) < 2)).astype(float)
    if sig.pattern == "grid":
        return ((ys % s < 3) | (xs % s < 3)).astype(float)
    if sig.pattern == "rings":
        return (np.hypot(ys - centre[1], xs - centre[0]) % s < sig.duty * s).astype(float)
    return np.zeros(len(ys))


def _paint(image: np.ndarray, mask: np.ndarray, sig: Signature, rng: np.random.Generator,
           centre: tuple[float, float] = (0.0, 0.0)) -> None:
    """Fill ``image`` ``(H, W, 3)`` float where ``mask`` ``(H, W)`` bool with the signature's texture, its colours
    shifted a little per instance."""
    ys, xs = np.nonzero(mask)
    mix = _pattern(sig, rng, ys, xs, centre)[:, None]
    first, second = np.asarray(sig.colour, float), np.asarray(sig.second, float)
    jitter = rng.uniform(-12, 12, size=3)
    image[ys, xs] = first + (second - first) * mix + jitter + rng.normal(0, 5, size=(len(ys), 3))


def _stuff_regions(rng: np.random.Generator) -> tuple[np.ndarray, list[str | None]]:
    """A weighted Voronoi partition of the canvas: ``(H, W)`` region index and each region's stuff class (None:
    unlabelled)."""
    count = int(rng.integers(2, 6))
    names: list[str | None] = [str(n) for n in rng.choice(list(STUFF), size=count, replace=False)]
    if rng.random() < UNLABELLED_FRACTION:
        names.append(None)
    sites = rng.uniform((0, 0), SIZE, size=(len(names), 2))
    weights = rng.uniform(0, 0.05 * SIZE[0] * SIZE[1], size=len(names))
    ys, xs = np.mgrid[0:SIZE[0], 0:SIZE[1]]
    distance = (ys[None] - sites[:, 0, None, None]) ** 2 + (xs[None] - sites[:, 1, None, None]) ** 2
    return np.argmin(distance - weights[:, None, None], axis=0), names


def render_scene(seed: int, index: int, split: str = "train") -> Scene:
    """Scene ``index`` of the ``split`` world with ``seed``: 2-5 stuff regions (one unlabelled in a fifth of the
    scenes) and 0-4 distinct things on top, possibly occluded.

    Returns a :class:`denseclip.synthetic.Scene` whose ``labels`` ``(480, 640)`` uint8 are raw COCO-Stuff ids
    (255 unlabelled), whose caption names every visible class, and whose objects are the stuff regions
    (``class``, ``raw_id``, ``pixels``) then the things (also ``shape``, ``center``, ``radius``, ``angle``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    ids = raw_ids()
    image = grey_background(rng, SIZE)  # what the unlabelled region shows
    labels = np.full(SIZE, UNLABELLED, dtype=np.uint8)
    regions, names = _stuff_regions(rng)
    stuff = []
    for region, name in enumerate(names):
        mask = regions == region
        if name is not None and mask.any():
            _paint(image, mask, STUFF[name], rng)
            labels[mask] = ids[name]
            stuff.append({"class": name, "raw_id": ids[name], "pixels": int(mask.sum())})
    count = 0 if rng.random() < 0.1 else int(rng.integers(1, MAX_THINGS + 1))
    placed: list[tuple[dict, np.ndarray]] = []
    for name in rng.choice(list(THINGS), size=count, replace=False):
        obj = {"class": str(name), "raw_id": ids[name], "shape": THINGS[name].shape}
        mask = place_object(rng, obj, SIZE, THING_RADIUS, placed)
        if mask is not None:
            _paint(image, mask, THINGS[name], rng, centre=tuple(obj["center"]))
            labels[mask] = ids[name]
    things = visible_objects(placed)
    for obj in stuff:  # what the things left of each region
        obj["pixels"] = int((labels == obj["raw_id"]).sum())
    objects = [obj for obj in stuff + things if obj["pixels"]]
    caption = list_caption(rng, [obj["class"] for obj in objects], frames=caption_frames(), article="")
    return Scene(np.clip(image, 0, 255).round().astype(np.uint8), labels, caption, objects)


def caption_crops(scene: Scene, rng: np.random.Generator, count: int, out: int,
                  sides: tuple[int, int] = (112, 160)) -> list[tuple[np.ndarray, str, tuple[int, ...]]]:
    """``count`` square crops of ``scene`` (side drawn from ``sides``, resized to ``out``), each ``((out, out, 3)
    uint8 image, caption, sorted raw ids named)``; the caption names the classes covering
    :data:`MIN_CAPTION_SHARE` of the crop. Crops that name no class (all unlabelled) are left out."""
    crops = []
    height, width = scene.labels.shape
    name_of = {obj["raw_id"]: obj["class"] for obj in scene.objects}
    for _ in range(count):
        side = int(rng.integers(sides[0], sides[1] + 1))
        y, x = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        labels = scene.labels[y:y + side, x:x + side]
        ids, counts = np.unique(labels, return_counts=True)
        named = tuple(int(i) for i, c in zip(ids, counts) if i != UNLABELLED and c >= MIN_CAPTION_SHARE * side ** 2)
        if not named:
            continue
        crop = Image.fromarray(scene.image[y:y + side, x:x + side]).resize((out, out), Image.BILINEAR)
        caption = list_caption(rng, [name_of[i] for i in named], frames=caption_frames(), article="")
        crops.append((np.asarray(crop), caption, named))
    return crops


def write_dataset(seed: int, n: int, out: str | Path, split: str = "train") -> list[Path]:
    """Render scenes ``0 .. n-1`` of the ``split`` world with ``seed`` into COCO-Stuff 164k's layout under ``out``
    (``images/{split}2017/*.jpg`` and ``annotations/{split}2017/*.png``, see the module); returns the images."""
    if n < 1:
        raise ValueError(f"need n >= 1, got n={n}")
    images, annotations = Path(out) / "images" / f"{split}2017", Path(out) / "annotations" / f"{split}2017"
    images.mkdir(parents=True, exist_ok=True)
    annotations.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n):
        name = f"{index:012d}"
        sample = scene_sample(render_scene(seed, index, split), name, seed, index)
        (images / f"{name}.jpg").write_bytes(sample["jpg"])
        (annotations / f"{name}.png").write_bytes(sample["seg.png"])
        paths.append(images / f"{name}.jpg")
    return paths
