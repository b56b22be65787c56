"""The workdir: its file names, the process that writes them, and how its logs are read.

Every file a run leaves is named here, so that the training loop, the evaluation modes, the
sweeps and the plots agree on them. Only process 0 writes shared files (`is_primary`); rewrites
go through a temporary file and a rename, so a reader (or a SIGKILL) never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import IO, Any

CONFIG = "config.json"  # the resolved config of the last training session
METRICS = "metrics.jsonl"  # one JSON object per line: step, split, metrics
CHECKPOINTS = "checkpoints"  # Orbax's directory
LEDGER = "test_ledger.jsonl"  # every look at the test split
SUMMARY = "summary.md"  # the end-of-training table
RUN = "run.json"  # a sweep point's wall time over sessions
FILTERS = "filters.png"  # --mode filters
TENSORBOARD = "tb"  # one event directory per split
HPARAMS = "tb/hparams"  # a sweep point's TensorBoard HParams session (overrides, final metrics)
LEAKAGE = "leakage.csv"  # exact copies between the splits (data/leakage.py)
PER_CLASS = "per_class_{split}.csv"  # the final report of a split (classification.py)
CONFUSION = "confusion_{split}"  # .npy always, .png up to 50 classes
PROFILE = "profile"  # --config.profile_steps=N: a jax.profiler trace (plugins/profile/<run>/)


def path(workdir: str, name: str) -> str:
    return os.path.join(workdir, name)


def is_primary() -> bool:
    """Process 0 of a multi-process run (or the only process) writes the shared files."""
    import jax

    return jax.process_index() == 0


@contextlib.contextmanager
def atomic_open(file: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Opens a temporary file next to `file`; on success it replaces `file` in one rename.

    The temporary file is in the same directory, so `os.replace` is a rename on one file system
    (atomic on POSIX). On an exception the temporary file is removed and `file` is untouched.
    The pid keeps concurrent writers (several processes, sweep points) off each other's file.
    """
    file = os.fspath(file)
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    root, ext = os.path.splitext(file)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(file: str, text: str) -> None:
    """Replaces `file` with `text` at once: readers see the old or the new content, never half."""
    with atomic_open(file) as f:
        f.write(text)


def read_jsonl(file: str, *, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The JSON objects of a log file, oldest first; [] if there is none.

    A log must never block a run: lines that are not JSON objects with the `required` keys (a
    torn last line from a killed write, junk) are skipped, with one warning naming the count.
    """
    if not os.path.exists(file):
        return []
    with open(file, "rb") as f:
        raw = f.read().split(b"\n")
    out, bad = [], 0
    for line in raw:
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            item = None
        if isinstance(item, dict) and all(k in item for k in required):
            out.append(item)
        else:
            bad += 1
    if bad:
        print(f"warning: skipped {bad} unreadable line(s) in {file}", file=sys.stderr, flush=True)
    return out


def append_jsonl(file: str, item: dict[str, Any]) -> None:
    """Appends one JSON line; a torn last line (a killed write) is ended first, not extended."""
    line = json.dumps(item) + "\n"
    with open(file, "ab+") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line  # the torn fragment stays a line of its own, skipped on read
        f.write(line.encode())


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All readable lines of a workdir's metrics.jsonl."""
    return read_jsonl(path(workdir, METRICS), required=("step", "split"))


LOCK = ".lock"  # held by the run that uses the workdir
DAMAGED = "damaged_checkpoints"  # checkpoints that failed to restore, moved aside


@contextlib.contextmanager
def locked(path: str, *, required: bool = True) -> Iterator[None]:
    """Holds an exclusive lock on the workdir for the block; a second run exits 2 at once.

    An OS lock (flock) dies with its process, so a SIGKILLed run never leaves a stale lock. Only
    process 0 locks: the processes of one multi-host job share the workdir, and a second job's
    process 0 fails here and takes its own job down with it.
    """
    import fcntl

    from alexnet_jax.errors import UsageError

    if not is_primary():
        yield
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--workdir {path} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        handle = open(os.path.join(path, LOCK), "a+")
    except OSError as e:
        if not required:  # a mode that only reads (a read-only copy of a finished run)
            yield
            return
        raise UsageError(f"cannot write to the workdir {path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UsageError(
                f"{path} is in use by {holder}; wait for it to finish or use another --workdir"
            ) from None
        import socket

        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        handle.close()
