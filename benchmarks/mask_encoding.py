"""How to store a label map in the mask store: PNG (zlib levels 1/6/9) vs raw uint8 + zstd.

    OMP_NUM_THREADS=1 python benchmarks/mask_encoding.py

Maps: the genuine VOC ground truth in tests/data, and DenseCLIP-like predictions (21-class logits at stride 16,
bilinearly upsampled to 500x334, argmax) with their max-probability confidence quantised to uint8, without and
with per-pixel noise. Prints bytes per map and milliseconds to encode / decode one map (median of 30).
"""

from __future__ import annotations

import io
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

VOC_GT = Path(__file__).resolve().parents[1] / "tests/data/samples/voc/SegmentationClass/2007_000129.png"
ZSTD = pa.Codec("zstd", compression_level=3)


def predicted_maps(noise: float, seed: int = 0, size=(500, 334), k: int = 21, stride: int = 16):
    generator = torch.Generator().manual_seed(seed)
    h, w = size
    logits = torch.randn(1, k, h // stride + 1, w // stride + 1, generator=generator)
    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    logits = logits + noise * torch.randn(logits.shape, generator=generator)
    confidence, labels = logits.softmax(1).max(1)
    return labels[0].numpy().astype(np.uint8), (confidence[0].numpy() * 255).round().astype(np.uint8)


def png(array: np.ndarray, level: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", compress_level=level)
    return out.getvalue()


def zstd(array: np.ndarray) -> bytes:
    return ZSTD.compress(array.tobytes(), asbytes=True)


def unzstd(data: bytes, shape) -> np.ndarray:
    raw = ZSTD.decompress(data, decompressed_size=shape[0] * shape[1], asbytes=True)
    return np.frombuffer(raw, np.uint8).reshape(shape)


def unpng(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def ms(fn, *args, repeats: int = 30, clock=time.perf_counter) -> float:
    """Median milliseconds per call of ``fn(*args)`` by ``clock`` (wall time; ``time.process_time``: CPU time)."""
    times = []
    for _ in range(repeats):
        start = clock()
        fn(*args)
        times.append(clock() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    labels, confidence = predicted_maps(noise=0.0)
    noisy_labels, noisy_confidence = predicted_maps(noise=0.3)
    maps = {"VOC ground truth": np.array(Image.open(VOC_GT)), "prediction": labels, "confidence": confidence,
            "noisy prediction": noisy_labels, "noisy confidence": noisy_confidence}
    print(f"{'map (500x334 uint8)':22s} {'png1':>7s} {'png6':>7s} {'png9':>7s} {'zstd3':>7s}   "
          f"{'enc png6':>8s} {'enc zstd':>8s}   {'dec png':>7s} {'dec zstd':>8s}")
    for name, array in maps.items():
        encoded = {level: png(array, level) for level in (1, 6, 9)}
        packed = zstd(array)
        assert (unpng(encoded[6]) == array).all()
        assert (unzstd(packed, array.shape) == array).all()
        print(f"{name:22s} {len(encoded[1]):7d} {len(encoded[6]):7d} {len(encoded[9]):7d} {len(packed):7d}   "
              f"{ms(png, array, 6):8.2f} {ms(zstd, array):8.2f}   "
              f"{ms(unpng, encoded[6]):7.2f} {ms(unzstd, packed, array.shape):8.2f}")


if __name__ == "__main__":
    main()
