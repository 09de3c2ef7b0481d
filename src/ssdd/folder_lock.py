"""One writer per run folder: an advisory ``flock`` on ``<out>/.ssdd.lock`` held while a job runs.

The operating system drops the lock when its process dies, however it dies, so a killed job never
leaves the folder locked; the pid written into the file only names the holder in the error.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ssdd import distributed
from ssdd.errors import UserError

_held: set[Path] = set()  # folders this process holds


@contextmanager
def hold(out: str | Path) -> Iterator[None]:
    """Hold ``out``'s lock for the block. Under torchrun rank 0 takes it for the whole job and every
    rank learns the outcome, so a refused job stops on all ranks with the same line, naming the
    holder's pid. A nested hold of the same folder (compare runs the pipeline) reuses the outer one."""
    folder = Path(out).resolve()
    if folder in _held:
        yield
        return
    fd, refusal = -1, None
    if distributed.is_main():
        fd, refusal = _acquire(folder, out)
    refusal = distributed.broadcast(refusal)
    if refusal:
        if fd >= 0:
            os.close(fd)
        raise UserError(refusal)
    _held.add(folder)
    try:
        yield
    finally:
        _held.discard(folder)
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _acquire(folder: Path, out: str | Path) -> tuple[int, str | None]:
    """(fd holding the lock, None) or (fd or -1, the one-line refusal)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".ssdd.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        return -1, f"--out {out}: cannot create the run folder's lock ({err.strerror or err})"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        return fd, (f"--out {out}: another ssdd job (pid {holder}) is running in this folder; wait for it to "
                    "finish or use another --out")
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd, None
