"""ImageNet-C corruptions for the robustness sweep (paper Tables 4-5): the 8 the paper uses, severities 1-5.

The operators come from ``imagecorruptions-imaug`` (installed under the module name ``imagecorruptions``), a
maintained drop-in for ``imagecorruptions`` 1.1.2, whose gaussian blur breaks on current scikit-image.
"""

from __future__ import annotations

import numpy as np
from imagecorruptions import corrupt as _imagenet_c

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
               "gaussian_blur", "defocus_blur", "spatter", "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIDE = 32  # the ImageNet-C operators refuse smaller images


def corrupt(image: np.ndarray, name: str, severity: int, seed: int | None = None) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1-5) to ``image``: uint8 (H, W, 3) RGB, H and W >= 32.

    Returns uint8 (H, W, 3). The operators draw from numpy's global random state; a given ``seed`` makes the
    result reproducible and leaves that global state as it was.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of 1-5, got {severity!r}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}; ImageNet-C needs both sides >= {MIN_SIDE}")
    # impulse noise draws from scikit-image's own generator, which takes the seed directly
    kwargs = {"seed": seed} if name == "impulse_noise" else {}
    if seed is None:
        return _imagenet_c(image, severity=severity, corruption_name=name, **kwargs)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return _imagenet_c(image, severity=severity, corruption_name=name, **kwargs)
    finally:
        np.random.set_state(state)
