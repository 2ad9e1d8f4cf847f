"""Rows as Ray Data hands them to ``map_batches``, for tests that drive the labeling stages without Ray."""

from __future__ import annotations

import numpy as np


def ray_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows -> a numpy batch (object columns hold arrays as they are)."""
    batch = {name: np.empty(len(rows), dtype=object) for name in rows[0]}
    for i, row in enumerate(rows):
        for name, value in row.items():
            batch[name][i] = value
    return batch
