"""The one way this package writes a file that someone may read after a crash.

The data go to a temporary file beside the target, are flushed and fsynced, and the
temporary file is renamed over the target (then the folder is fsynced, so the rename
itself survives a power cut). A crash at any moment leaves the previous file or the new
one under the final name, never a torn one. Temporary files are named ``.<name>.tmp-<pid>``
so that `stale_temporaries` can find what a killed writer left behind.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO, Callable, Union

Data = Union[bytes, str, Callable[[BinaryIO], None]]


def atomic_write(path: str | Path, data: Data) -> Path:
    """Write `data` (bytes, text as UTF-8, or a function that writes into a binary file) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        full = _disk_full(e)
        if full is not None:  # torch.save reports it as a RuntimeError around the OSError
            raise OSError(full.errno, full.strerror, str(path)) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(e: BaseException) -> OSError | None:
    """The "no space left" OSError in an exception's chain, if there is one."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return e
        e = e.__cause__ or e.__context__
    return None


def stale_temporaries(folder: str | Path) -> list[Path]:
    """Temporary files of `atomic_write` in `folder` whose writer process no longer runs."""
    found = []
    for tmp in Path(folder).glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            found.append(tmp)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
