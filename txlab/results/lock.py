"""One writer per store: an flock on local disk (`local_lock`), a lease object on object storage
(`WriterLease`). `txlab.results.store.Store.writer_lock` takes the one that fits the store's filesystem."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Protocol

import pyarrow.fs as pafs

from txlab.results.errors import StoreLocked, warn
from txlab.results.layout import LEASE, LOCK
from txlab.text import first_line

LEASE_FORMAT = "txlab-writer-lease"

# The writer lease on object storage (see `WriterLease`): a crashed driver holds the store at most
# LEASE_TTL_S; a live one renews every LEASE_RENEW_S; a new holder waits LEASE_SETTLE_S after writing its
# lease and reads it back, so that of two drivers starting at once exactly one keeps it.
LEASE_TTL_S = 120.0
LEASE_RENEW_S = 30.0
LEASE_SETTLE_S = 3.0


class Location(Protocol):
    """What the lease needs of a store: where it is (a `txlab.results.store.Store` is one)."""

    uri: str  # as the user gave it, for messages
    fs: pafs.FileSystem
    root: str  # the store's directory in `fs`


@contextlib.contextmanager
def local_lock(root: str, uri: str) -> Iterator[None]:
    """Hold the flock on ROOT/_txlab_writer.lock, which names its holder (pid and host); StoreLocked naming
    the holder when another process has it. The kernel drops an flock when its holder dies, even by
    SIGKILL, so a killed sweep never leaves a stale lock."""
    import fcntl

    path = f"{root}/{LOCK}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise StoreLocked(f"{uri}: another txlab sweep is writing to this store ({holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # releases the flock


class WriterLease:
    """A store's writer lock where the filesystem has none (object storage): the object DIR/_txlab_writer.lease
    holds {holder, token, renewed_at, expires_at} (JSON, wall-clock seconds).

    Taking it: read the lease; a live one (expires_at in the future) held by someone else refuses, naming
    its holder. Otherwise write ours, wait `settle_s`, read it back: of two drivers that both found the
    store free, the later writer's lease is what both read back, so exactly one keeps it and the other is
    refused (this holds while a driver's read-to-write gap, one small GET and PUT, is under `settle_s`).
    Holding it: a daemon thread renews it every `renew_s`, after checking it is still ours; if it is not
    (another driver took it over after we failed to renew in time), `lost` says so and the sweep stops.
    Releasing: delete it if still ours. A crashed driver's lease expires `ttl_s` after its last renewal.
    Clocks of the machines involved must agree to well under `ttl_s` (NTP).

    Why not a conditional put: pyarrow's S3 and GCS filesystems, which the store uses, expose none; a lease
    needs only reads and whole-object writes, which every object store and pyarrow filesystem has.
    """

    def __init__(self, store: Location, ttl_s: float, renew_s: float, settle_s: float):
        self.store, self.path = store, f"{store.root}/{LEASE}"
        self.ttl_s, self.renew_s, self.settle_s = ttl_s, renew_s, settle_s
        self.token = uuid.uuid4().hex
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self.lost: str | None = None
        self._acquired_at = 0.0
        self._expires_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        """The lease object, None when there is none; an unreadable one reads as expired."""
        try:
            with self.store.fs.open_input_stream(self.path) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            lease = json.loads(data.decode())
            if not isinstance(lease, dict) or lease.get("format") != LEASE_FORMAT:
                raise ValueError("not a txlab writer lease")
            lease["expires_at"] = float(lease["expires_at"])
            lease["renewed_at"] = float(lease.get("renewed_at", lease["expires_at"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return {"token": None, "holder": "an unreadable lease", "expires_at": 0.0, "renewed_at": 0.0}
        return lease

    def _write(self) -> None:
        now = time.time()
        body = {
            "format": LEASE_FORMAT,
            "holder": self.holder,
            "token": self.token,
            "acquired_at": self._acquired_at or now,
            "renewed_at": now,
            "expires_at": now + self.ttl_s,
            "ttl_s": self.ttl_s,
        }
        with self.store.fs.open_output_stream(self.path) as f:
            f.write(json.dumps(body).encode())
        self._acquired_at = self._acquired_at or now
        self._expires_at = now + self.ttl_s

    def _refusal(self, lease: dict[str, Any]) -> StoreLocked:
        now = time.time()
        return StoreLocked(
            f"{self.store.uri}: another txlab sweep is writing to this store ({lease.get('holder') or 'unknown holder'}; "
            f"lease renewed {max(0.0, now - lease['renewed_at']):.0f} s ago, expires in "
            f"{max(0.0, lease['expires_at'] - now):.0f} s unless renewed)"
        )

    def acquire(self) -> None:
        current = self.read()
        if current is not None and current.get("token") != self.token and current["expires_at"] > time.time():
            raise self._refusal(current)
        if current is not None and current["expires_at"] <= time.time() and current.get("token") is not None:
            warn(f"{self.store.uri}: taking over the expired writer lease of {current.get('holder')}")
        self._write()
        time.sleep(self.settle_s)
        current = self.read()
        if current is None or current.get("token") != self.token:
            if current is None:
                raise StoreLocked(f"{self.store.uri}: the writer lease vanished while taking it; another sweep? retry")
            raise self._refusal(current)
        self._thread = threading.Thread(target=self._renew_loop, name="txlab-store-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                current = self.read()
                if current is None or current.get("token") != self.token:
                    holder = current.get("holder") if current else None
                    self.lost = (
                        f"the writer lease was taken over by {holder}" if holder else "the writer lease was deleted"
                    )
                    return
                self._write()
            except OSError as e:
                if time.time() >= self._expires_at:
                    self.lost = f"the writer lease could not be renewed before it expired ({first_line(e, 200)})"
                    return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.renew_s + 5)
        try:
            current = self.read()
            if current is not None and current.get("token") == self.token:
                self.store.fs.delete_file(self.path)
        except OSError:
            pass  # it expires by itself
