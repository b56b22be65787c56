"""Atomic file writes: a reader (or a run killed half-way) never sees a half-written file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Opens a temporary file next to `path`; on success it replaces `path` in one rename.

    The temporary file is in the same directory, so `os.replace` is a rename on one file system
    (atomic on POSIX). On an exception the temporary file is removed and `path` is untouched.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # The pid keeps concurrent writers (several processes of one run) off each other's file.
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
