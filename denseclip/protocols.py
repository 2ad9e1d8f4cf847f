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
