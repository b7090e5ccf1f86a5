"""Writing a file so that readers, and a process killed at any moment, see the old file or the new one, never a torn one."""
import contextlib
import os
import threading
from pathlib import Path


def temp_name(path):
    """The hidden temporary ``.NAME.PID-THREAD.tmp`` beside ``path``: parallel writers, processes or
    threads of one process, never share one."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def is_temp_name(name):
    """Whether a file name is one of :func:`temp_name`'s (a leftover of a killed writer)."""
    return name.startswith(".") and name.endswith(".tmp")


@contextlib.contextmanager
def atomic_open(path, mode="wb", **open_kwargs):
    """``open`` a temporary file for writing; on success it is synced and renamed over ``path``.

    ``os.replace`` is atomic within one file system. On any error the temporary file is removed
    and ``path`` keeps its old content.
    """
    tmp = temp_name(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
