"""The workdir: its file names, the process that writes them, and how its logs are read.

Every file a run leaves is named here, so that the training loop, the evaluation modes, the
sweeps and the plots agree on them. Only process 0 writes shared files (`is_primary`); rewrites
go through a temporary file and a rename, so a reader (or a SIGKILL) never sees half a file.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

CONFIG = "config.json"  # the resolved config of the last training session
METRICS = "metrics.jsonl"  # one JSON object per line: step, split, metrics
CHECKPOINTS = "checkpoints"  # Orbax's directory
LEDGER = "test_ledger.jsonl"  # every look at the test split
SUMMARY = "summary.md"  # the end-of-training table
RUN = "run.json"  # a sweep point's wall time over sessions
FILTERS = "filters.png"  # --mode filters
TENSORBOARD = "tb"  # one event directory per split


def path(workdir: str, name: str) -> str:
    return os.path.join(workdir, name)


def is_primary() -> bool:
    """Process 0 of a multi-process run (or the only process) writes the shared files."""
    import jax

    return jax.process_index() == 0


def write_atomic(file: str, text: str) -> None:
    """Replaces `file` with `text` at once: readers see the old or the new content, never half."""
    tmp = f"{file}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


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
