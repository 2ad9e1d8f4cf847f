"""The 8 ImageNet-C corruptions on a real photo at odd sizes: shape, dtype, strength grows with severity."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from denseclip.corruptions import CORRUPTIONS, SEVERITIES, corrupt

PHOTO = Path(__file__).parent / "data" / "samples" / "voc" / "JPEGImages" / "2007_000129.jpg"


@pytest.fixture(scope="module", params=[(375, 500), (128, 128)], ids=["375x500", "128x128"])
def photo(request) -> np.ndarray:
    height, width = request.param
    return np.asarray(Image.open(PHOTO).convert("RGB").resize((width, height)))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_severity_keeps_size_and_gets_stronger(photo, name):
    distances = []
    for severity in SEVERITIES:
        out = corrupt(photo, name, severity, seed=0)
        assert out.dtype == np.uint8 and out.shape == photo.shape
        distances.append(np.abs(out.astype(np.float64) - photo).mean())
    assert distances[0] > 0
    assert distances == sorted(distances), distances


def test_the_eight_corruptions_of_the_paper():
    assert set(CORRUPTIONS) == {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
                                "gaussian_blur", "defocus_blur", "spatter", "jpeg_compression"}


@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise", "spatter"])
def test_seed_makes_it_reproducible_and_restores_global_state(photo, name):
    np.random.seed(123)
    expected_next = np.random.random()
    np.random.seed(123)
    a = corrupt(photo, name, 3, seed=7)
    assert np.random.random() == expected_next
    np.testing.assert_array_equal(a, corrupt(photo, name, 3, seed=7))
    assert not np.array_equal(a, corrupt(photo, name, 3, seed=8))


def test_bad_arguments_are_named():
    image = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(image, "fog", 1)
    with pytest.raises(ValueError, match="severity must be one of 1-5, got 6"):
        corrupt(image, "gaussian_noise", 6)
    with pytest.raises(ValueError, match="float32"):
        corrupt(image.astype(np.float32), "gaussian_noise", 1)
    with pytest.raises(ValueError, match="20x40; ImageNet-C needs"):
        corrupt(np.zeros((40, 20, 3), np.uint8), "gaussian_noise", 1)
