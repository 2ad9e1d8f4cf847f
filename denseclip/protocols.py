"""Named inference protocols: the settings under which published numbers were measured, as data.

A protocol (``data/protocols.json``) maps to ``LabelerConfig`` field values: a ``default`` for any vocabulary,
overridden per dataset. A protocol only supplies defaults; fields a user sets explicitly always win.
Kept free of torch imports (it is read while a configuration is validated).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

PROTOCOLS_FILE = Path(__file__).parent / "data" / "protocols.json"


class ProtocolError(ValueError):
    """An unknown protocol name; the message lists the known ones."""


@functools.cache
def _protocols() -> dict[str, dict]:
    return json.loads(PROTOCOLS_FILE.read_text(encoding="utf-8"))


def protocol_names() -> tuple[str, ...]:
    """The registered protocols (``paper``, ...)."""
    return tuple(_protocols())


def protocol_description(protocol: str) -> str:
    return _entry(protocol)["description"]


def _entry(protocol: str) -> dict:
    if protocol not in _protocols():
        raise ProtocolError(f"unknown protocol {protocol!r}; known: {', '.join(protocol_names())}")
    return _protocols()[protocol]


def protocol_defaults(protocol: str, dataset: str | None = None) -> dict:
    """``LabelerConfig`` field values of ``protocol`` for ``dataset`` (None: a free vocabulary): the
    protocol's default, updated with the dataset's own entry; ``protocol`` itself is included."""
    entry = _entry(protocol)
    values = dict(entry["default"])
    values.update(entry.get("datasets", {}).get(dataset, {}))
    values["protocol"] = protocol
    return values


def keep_ratio_size(height: int, width: int, resize_to: tuple[int, int] | None) -> tuple[int, int]:
    """The size ``(h, w)`` MMSegmentation's keep-ratio ``Resize(img_scale=(long, short))`` gives a ``height x
    width`` image: scaled by ``min(long / max(h, w), short / min(h, w))``, rounded as ``int(x * scale + 0.5)``
    (a 500x375 image becomes 683x512 for (2048, 512)); as it is for None."""
    if resize_to is None:
        return height, width
    long, short = resize_to
    scale = min(long / max(height, width), short / min(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
