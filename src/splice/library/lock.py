"""The library's write lock: `fcntl.flock` on a `.lock` file inside the library folder.

Every write (bind, add, remove, rename, cleanup) holds it, so two processes writing to one
library take turns. Reads take no lock: an entry appears and disappears by one `os.rename`,
so a reader sees it whole or not at all. The lock belongs to the open file, and the kernel
drops it when the process dies, so a crash never leaves a library locked. For the same
reason a child forked while the lock is held shares it: do not fork inside a write.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


@contextmanager
def write_lock(folder: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold the lock of the library at `folder` (created if missing) for the `with` body.

    Yields True once held. With wait=False it yields False at once when another process
    holds it. Not re-entrant: a second `write_lock` on the same library inside the body
    blocks forever, as the two opens are separate lock holders.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the file releases the lock
