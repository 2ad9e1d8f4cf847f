"""What a failed read means, one definition for every stage: damage of the bytes read, or a passing failure of
the storage they are read from.

Damage is in the bytes: a tar shard that is truncated or corrupt (:data:`SHARD_DAMAGE`), a mask-store part that
does not parse or whose size, row count or digest disagrees with its record. No retry mends it: a damaged
shard becomes an error row (labelling, evaluation) or ends its samples early (training); a damaged part is
relabelled by the next labelling run, and its readers name it or skip it when asked. A transient failure is the
storage's (:func:`is_transient`): an ``OSError`` while reading, such as a dropped connection or a throttled or
timed-out request, other than a missing or forbidden file. It is retried, then raised: the run fails, keeps what
it committed, and a re-run resumes.
"""

from __future__ import annotations

import tarfile
import zlib

# Reads of a shard are attempted this often, waiting RETRY_DELAY_S, then twice as long each time (0.5 + 1 + 2 s):
# long enough for a throttled request or a restarted endpoint, short enough not to hide an outage.
READ_ATTEMPTS = 4
RETRY_DELAY_S = 0.5
# What reading a tar raises for bytes that are not a tar (tarfile wraps decompression errors in ReadError).
SHARD_DAMAGE = (tarfile.TarError, EOFError, zlib.error)
# OSErrors that no retry changes: the file is missing or forbidden, not passing trouble.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class DamageError(OSError):
    """Bytes at ``url`` that cannot be what they should be; ``reason`` says why."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason

    def __reduce__(self):  # OSError pickles its message only; Ray ships exceptions between processes
        return type(self), (self.url, self.reason)


class DamagedShardError(DamageError):
    """A tar shard that is truncated or corrupt (the samples before the damage were read)."""


class DamagedPartError(DamageError):
    """A mask-store part file that does not parse or disagrees with its record."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc``, raised while reading, is a passing failure of the storage worth retrying."""
    return isinstance(exc, OSError) and not isinstance(exc, (DamageError, *_PERMANENT))
