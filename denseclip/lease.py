"""A lease on an output folder, so that two runs (two firings of a schedule that overlap) never write one store.

The lease is the object ``<output>/lease.json``::

    {"holder": "<run id>", "host": "...", "pid": 123, "acquired_at": "...", "renewed_at": "...",
     "expires_at": "2026-01-01T00:00:00+00:00", "expires": 1767225600.0, "ttl_s": 60.0}

A run takes it when it is absent, released or expired, renews it every ``ttl / 3`` seconds from a background
thread while it runs, and releases it (sets its expiry to now) when it ends; the lease of a run that died expires
``ttl`` seconds after its last renewal and is then taken over, at once when the holder ran on this machine (same
host name, boot and process namespace) and its process is gone. Every change is a compare-and-swap, so two runs
can never both believe they hold it: on S3 a conditional PUT (``If-None-Match: *`` to create, ``If-Match:
<ETag>`` to replace), on local disk a read-modify-write under ``flock(2)`` on ``<output>/lease.lock``. Expiry
times are wall-clock UTC: hosts sharing an output need clocks within a small fraction of ``ttl``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec

from denseclip import storage

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
LOCK_FILE = "lease.lock"
DEFAULT_TTL_S = 60.0
_POLL_S = 1.0


class LeaseError(RuntimeError):
    """The lease could not be taken or was lost; the message says by whom it is held."""


class LeaseHeld(LeaseError):
    """Another live run holds the lease (``record``: its lease)."""

    def __init__(self, url: str, record: dict, waited: float):
        self.record = record
        super().__init__(
            f"{url} is held by another run: holder {record.get('holder')} on host {record.get('host')} "
            f"(pid {record.get('pid')}), lease renewed at {record.get('renewed_at')}, expires at "
            f"{record.get('expires_at')} unless renewed" + (f"; waited {waited:.0f} s" if waited else ""))


class LeaseLost(RuntimeError):
    """This run's lease expired or was taken over while it ran: it must stop writing (a failure of the run, not
    a reason it could not start)."""


def _process_space() -> str:
    """Where this process's id means something: the kernel's boot id and the pid namespace ("" off Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _died_here(record: dict) -> bool:
    """The holder of ``record`` ran in this machine's process space and its process no longer exists."""
    if not record.get("space") or record["space"] != _process_space() or record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, owned by another user
        return False
    return False


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class _Version:
    """What a compare-and-swap compares: the object's ETag (S3) or its bytes (local)."""

    token: str | bytes | None
    record: dict | None


class _LocalBackend:
    """lease.json on local disk, every change made under flock on lease.lock (released if the process dies)."""

    def __init__(self, url: str):
        self.path = os.path.join(url, LEASE_FILE)
        self.lock_path = os.path.join(url, LOCK_FILE)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(os.path.abspath(self.lock_path)), exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read(self) -> _Version:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return _Version(None, None)
        return _Version(data, json.loads(data))

    def read(self) -> _Version:
        with self._locked():
            return self._read()

    def swap(self, expected: _Version, record: dict) -> bool:
        with self._locked():
            if self._read().token != expected.token:
                return False
            storage.write_bytes(self.path, json.dumps(record, sort_keys=True).encode())
            return True


class _S3Backend:
    """lease.json in an S3 bucket, changed by conditional PUTs."""

    def __init__(self, url: str, storage_options: dict):
        self.fs, self.path = fsspec.core.url_to_fs(storage.join(url, LEASE_FILE), **storage_options)

    def read(self) -> _Version:
        try:
            with self.fs.open(self.path, "rb", cache_type="none") as f:
                data = f.read()
                etag = f.details["ETag"]
        except FileNotFoundError:
            return _Version(None, None)
        return _Version(etag, json.loads(data))

    def swap(self, expected: _Version, record: dict) -> bool:
        data = json.dumps(record, sort_keys=True).encode()
        try:
            if expected.token is None:
                self.fs.pipe_file(self.path, data, mode="create")
            else:
                self.fs.pipe_file(self.path, data, IfMatch=expected.token)
        except OSError:
            # A failed precondition (someone else wrote first) reads as an OSError; so does a network error.
            # Which one it was shows in the object now: ours only if our write went through after all.
            current = self.read()
            if current.record is not None and current.record.get("token") == record["token"]:
                return True
            if current.token != expected.token:
                return False
            raise
        return True


class Lease:
    """The lease on the output ``url`` (a local folder or ``s3://`` URL) for this run; a context manager that
    takes it (waiting up to ``wait_s`` seconds for a live holder), renews it in the background and releases it.

    Raises :class:`LeaseHeld` when another live run keeps it past ``wait_s``; :meth:`check` raises
    :class:`LeaseLost` once renewal failed for longer than the lease lasts.
    """

    def __init__(self, url: str, ttl_s: float = DEFAULT_TTL_S, wait_s: float = 0.0,
                 storage_options: dict | None = None):
        if ttl_s <= 0 or wait_s < 0:
            raise ValueError(f"lease: ttl_s must be > 0 and wait_s >= 0, got {ttl_s} and {wait_s}")
        self.url, self.ttl_s, self.wait_s = url, float(ttl_s), float(wait_s)
        if storage.is_local(url):
            self._backend = _LocalBackend(fsspec.core.url_to_fs(url)[1])
        elif fsspec.utils.get_protocol(url) in ("s3", "s3a"):
            self._backend = _S3Backend(url, storage_options or {})
        else:
            raise LeaseError(f"{url}: leases need conditional writes, available on local disk and S3 only")
        self.holder = uuid.uuid4().hex
        self.taken_over: dict | None = None  # the expired lease of a dead run that this one replaced
        self._version: _Version | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _record(self, acquired: float) -> dict:
        now = time.time()
        return {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(), "space": _process_space(),
                "acquired_at": _iso(acquired), "renewed_at": _iso(now), "expires_at": _iso(now + self.ttl_s),
                "expires": now + self.ttl_s, "ttl_s": self.ttl_s, "token": uuid.uuid4().hex}

    def acquire(self) -> None:
        """Take the lease, waiting up to ``wait_s`` for a live holder to finish or die."""
        start = time.monotonic()
        while True:
            current = self._backend.read()
            held = (current.record is not None and current.record["expires"] > time.time()
                    and not _died_here(current.record))
            if not held:
                mine = self._record(time.time())
                if self._backend.swap(current, mine):
                    self._version = self._backend.read()
                    if (self._version.record or {}).get("token") != mine["token"]:
                        continue  # read back as another run's: a store whose conditional writes are not atomic
                    if current.record is not None and not current.record.get("released"):
                        self.taken_over = current.record
                        log.warning("took over the lease of %s on %s (pid %s, no longer running) on %s",
                                    current.record["holder"], current.record["host"], current.record["pid"],
                                    self.url)
                    return
                continue  # someone else changed it first: look again
            waited = time.monotonic() - start
            if waited >= self.wait_s:
                raise LeaseHeld(self.url, current.record, waited)
            time.sleep(min(_POLL_S, self.wait_s - waited))

    def renew(self) -> None:
        """Extend the lease by ``ttl_s`` from now; raises LeaseLost if another run has taken it."""
        acquired = datetime.datetime.fromisoformat(self._version.record["acquired_at"]).timestamp()
        if not self._backend.swap(self._version, self._record(acquired)):
            raise LeaseLost(f"{self.url}: the lease was taken over by another run")
        self._version = self._backend.read()

    def check(self) -> None:
        """Raise LeaseLost unless this run still holds the lease (its last renewal has not expired)."""
        if self._lost:
            raise LeaseLost(self._lost)
        if self._version is None or self._version.record["expires"] <= time.time():
            raise LeaseLost(f"{self.url}: this run's lease expired (renewal failed for {self.ttl_s:g} s)")

    def release(self) -> None:
        """Expire the lease now, if this run still holds it (a lease lost meanwhile stays its new holder's)."""
        if self._version is None or self._lost:
            return
        released = {**self._version.record, "expires": time.time(), "expires_at": _iso(time.time()),
                    "released": True, "token": uuid.uuid4().hex}
        with contextlib.suppress(OSError):
            self._backend.swap(self._version, released)
        self._version = None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost as exc:
                self._lost = str(exc)
                log.error("%s", exc)
                return
            except OSError as exc:  # a transient storage error: try again; check() fails once the lease expires
                log.warning("renewing the lease on %s failed, will retry: %s", self.url, exc)

    def __enter__(self) -> Self:
        self.acquire()
        self._renewer = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        self.release()
