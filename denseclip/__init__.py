"""denseclip: free dense, open-vocabulary labels from a frozen CLIP (DenseCLIP / MaskCLIP, Zhou, Loy & Dai,
ECCV 2022), distilled into a segmentation network (DenseCLIP+), on Ray.

    import denseclip

    clip = denseclip.load_clip()                        # RN50 with OpenAI's weights, as the paper
    labeler = denseclip.DenseCLIP(clip, ["cat", "dog", ["background", "sky", "wall"]])
    labels, confidence = labeler.label_images(["photo.jpg"])[0]   # paths, PIL images or (H, W, 3) uint8 arrays
    features = denseclip.dense_features(clip.model, images)   # (B, D, H/s, W/s), CLIP's joint space

The names below are imported when first used, so ``import denseclip`` loads neither torch nor Ray; the Ray
pipelines live in ``denseclip.ray`` and are imported only from there.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load_clip": "denseclip.models",
    "LoadedCLIP": "denseclip.models",
    "ModelLoadError": "denseclip.models",
    "dense_features": "denseclip.dense",
    "DenseCLIP": "denseclip.predictor",
    "LabelerConfig": "denseclip.config",
    "ConfigError": "denseclip.config",
    "class_embeddings": "denseclip.text",
    "get_dataset": "denseclip.datasets",
    "MaskStore": "denseclip.mask_store",
    "ConfusionMatrix": "denseclip.metrics",
    "summarize": "denseclip.metrics",
    "write_report": "denseclip.report",
    "class_palette": "denseclip.visualize",
    "overlay": "denseclip.visualize",
}
__all__ = [
    "ConfigError",
    "ConfusionMatrix",
    "DenseCLIP",
    "LabelerConfig",
    "LoadedCLIP",
    "MaskStore",
    "ModelLoadError",
    "__version__",
    "class_embeddings",
    "class_palette",
    "dense_features",
    "get_dataset",
    "load_clip",
    "overlay",
    "summarize",
    "write_report",
]  # "__version__" and the keys of _EXPORTS


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'denseclip' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
