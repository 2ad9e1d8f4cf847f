"""Reading a store's files: what a damaged part is (:class:`PartDamage`), a Parquet read that names the file whose
bytes are at fault while the storage's own failures pass unchanged, what was read of a part, and a small cache."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from denseclip.damage import DamagedPartError


def _file_id(info: dict) -> str:
    """What identifies one version of a committed file in a listing: the object's ETag, or on local disk its
    size, inode and modification time (a part is always replaced by renaming a new file over it)."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    return f"{info.get('size')}-{info.get('ino', '')}-{info.get('mtime', info.get('LastModified', ''))}"


@dataclass(frozen=True)
class PartDamage:
    """A committed part found damaged: its ``part`` id, the ``url`` of the file at fault, the input ``shard`` it
    holds (None when nothing readable names it) and the ``reason``."""

    part: str
    url: str
    shard: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.url} (shard {self.shard or 'unknown'}): {self.reason}"


class _StorageFailure(Exception):
    """The storage failed under a Parquet read; its exception is the cause. pyarrow passes on what a Python file
    raises unchanged, so this tells the storage's failures from what pyarrow raises about the bytes."""


class _StorageFile:
    """A file of the store as pyarrow reads it: the storage's failures come out as :class:`_StorageFailure`."""

    def __init__(self, file):
        self._file = file

    def __getattr__(self, name):
        return getattr(self._file, name)

    def read(self, *args):
        try:
            return self._file.read(*args)
        except Exception as exc:
            raise _StorageFailure() from exc

    def seek(self, *args):
        try:
            return self._file.seek(*args)
        except Exception as exc:
            raise _StorageFailure() from exc


@contextlib.contextmanager
def _reading(url: str) -> Iterator[None]:
    """Within the block, what pyarrow raises about the bytes of the Parquet file ``url`` (opened through a
    :class:`_StorageFile`) becomes a DamagedPartError naming it; the storage's own failures pass unchanged."""
    try:
        yield
    except _StorageFailure as exc:
        raise exc.__cause__ from None
    except DamagedPartError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: also a part record that is not JSON
        raise DamagedPartError(url, f"unreadable: {type(exc).__name__}: {exc}") from exc


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
        return value

    def hit(self, key):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None


@dataclass
class _PartState:
    """What one committed part holds, as far as it was read: its ``record`` and ``manifest``, the ``rows`` of its
    masks footer and its ``keys``."""

    record: dict | None = None
    manifest: dict | None = None
    rows: int | None = None
    keys: pa.ChunkedArray | None = None
