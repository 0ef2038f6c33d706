"""One driver per campaign directory: an `flock` on local paths, a lease on object stores.

Local and shared (NFS) paths: an exclusive `flock` on `<campaign>/driver.lock`, holding
the driver's pid. The kernel drops it when the process dies, so a killed driver never
leaves the campaign locked.

Object stores (s3:// ...) have no locks. There the lock file is a lease: the holder's id,
host and pid and when it last renewed it, rewritten every `LEASE_RENEW_S` by a thread of
the driver. A lease not renewed for `LEASE_TTL_S` (its driver died), or one whose driver
process is gone from this host, is taken over. A
driver that writes a lease reads it back `LEASE_SETTLE_S` later and goes on only if it is
still its own, so of two drivers starting together the later writer wins and the other is
refused. pyarrow offers no create-if-absent write, so two drivers whose read and write
straddle each other's settle wait could both win; the settle wait makes that need a
pause of seconds between one driver's read and its write.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from pydantic import BaseModel, ValidationError

from seqedit.errors import SeqeditError
from seqedit.storage import Location, Where, location

LOCK_FILE = "driver.lock"
LEASE_TTL_S = 60.0
LEASE_RENEW_S = 10.0
LEASE_SETTLE_S = 2.0


class CampaignBusyError(SeqeditError, RuntimeError):
    """Another driver process is running this campaign directory."""


class Lease(BaseModel):
    """The content of `driver.lock` on an object store."""

    owner: str
    host: str
    pid: int
    renewed_at: float

    def live(self) -> bool:
        """Renewed within `LEASE_TTL_S`, by a process that still runs where that can be
        seen (a driver of this host that died frees its lease at once)."""
        if time.time() - self.renewed_at >= LEASE_TTL_S:
            return False
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def holder(self) -> str:
        return f"pid {self.pid} on {self.host}"


def _busy(root: Location, holder: str) -> CampaignBusyError:
    return CampaignBusyError(
        f"{root}: a driver ({holder}) is running this campaign; "
        "wait for it, or stop it, before running it again"
    )


@contextmanager
def driver_lock(campaign_dir: Where) -> Iterator[None]:
    """Hold the campaign's driver lock for the block; a second live driver is refused with
    `CampaignBusyError`."""
    root = location(campaign_dir)
    if root.is_local:
        with _flock(root):
            yield
    else:
        with _lease(root):
            yield


def driver_running(campaign_dir: Where) -> bool:
    """Whether a live driver holds the campaign's lock right now."""
    root = location(campaign_dir)
    path = root / LOCK_FILE
    if not path.exists():
        return False
    if not root.is_local:
        lease = _read_lease(path)
        return lease is not None and lease.live()
    fd = os.open(path.local_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def lock_holder(campaign_dir: Where) -> str:
    """Who holds the lock file, as its content says ("?" if it says nothing)."""
    root = location(campaign_dir)
    path = root / LOCK_FILE
    if not root.is_local:
        lease = _read_lease(path)
        return lease.holder() if lease is not None else "?"
    text = path.read_text().strip() if path.exists() else ""
    return f"pid {text}" if text else "?"


@contextmanager
def _flock(root: Location) -> Iterator[None]:
    root.mkdir()
    fd = os.open((root / LOCK_FILE).local_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise _busy(root, f"pid {holder}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_lease(path: Location) -> Lease | None:
    try:
        return Lease.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValidationError:
        return None  # a damaged lease protects nothing: taken over


@contextmanager
def _lease(root: Location) -> Iterator[None]:
    path = root / LOCK_FILE
    current = _read_lease(path)
    if current is not None and current.live():
        raise _busy(root, current.holder())
    mine = Lease(owner=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(), renewed_at=0)

    def renew() -> None:
        mine.renewed_at = time.time()
        path.write_text(mine.model_dump_json())

    renew()
    time.sleep(LEASE_SETTLE_S)
    current = _read_lease(path)
    if current is None or current.owner != mine.owner:
        raise _busy(root, current.holder() if current else "?")
    stop = threading.Event()

    def keep_renewing() -> None:
        while not stop.wait(LEASE_RENEW_S):
            with suppress(OSError):  # the next renewal tries again; a lease lasts LEASE_TTL_S
                renew()

    renewer = threading.Thread(target=keep_renewing, name="seqedit-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        if (held := _read_lease(path)) is not None and held.owner == mine.owner:
            path.unlink(missing_ok=True)
