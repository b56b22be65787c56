"""Leakage check: no example of one split may be an exact copy of an example of another.

A test image that is also a training image scores what the model memorised, not what it learnt,
and a validation copy of a training image flatters every choice tuned on it (REFERENCE.md,
"Train / validation / test"). Web-scraped sets can hold such copies, and an image folder
gains them by a careless `cp`. So a run hashes every example's content once, before training,
and reports the copies:

- a source's `content_hashes()` maps 'train', 'val', 'test' to [(example id, hex digest)]:
  the file's bytes for an image folder, the encoded image of a TFDS record for ImageNet (read
  from a sidecar that `prepare` writes next to the 256-pixel copy), the raw pixels for the
  in-memory digits; a source with nothing to hash (synthetic) returns {}.
- `check` prints one line, writes `<workdir>/leakage.csv` and, with `data.on_leakage='refuse'`,
  stops the run (UsageError: exit 2) before any training step.

Only exact copies are found: a resized or re-encoded copy has other bytes. That is the cheap
check that must always run; near-duplicates need a perceptual hash and a threshold.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

from alexnet_jax import workdir
from alexnet_jax.errors import UsageError
from alexnet_jax.workdir import atomic_open

log = logging.getLogger(__name__)

ON_LEAKAGE_CHOICES = ("warn", "refuse")
LEAKAGE_FILE = workdir.LEAKAGE
CSV_COLUMNS = ("split_a", "id_a", "split_b", "id_b", "digest")
SPLIT_ORDER = ("train", "val", "test")  # a copy is reported in the later of its two splits

Hashes = dict[str, list[tuple[str, str]]]  # split -> [(example id, hex digest)]


def digest(data: bytes) -> str:
    """The hex digest of `data`: BLAKE2b-128, faster than SHA-1 in software, and at 1.3 M
    examples an accidental collision has odds around 1e-26."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _hash_file(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return digest(f.read())
    except OSError as e:  # deleted or unreadable since the source listed it: not a copy
        log.warning("leakage check: cannot read %s (%s); not hashed", path, e)
        return None


def hash_files(paths: Sequence[str], ids: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """[(id, digest of the file's bytes)] in the order of `paths` (ids default to the paths).

    Threads, because reading is I/O-bound and hashlib releases the GIL on large buffers.
    """
    ids = list(paths) if ids is None else list(ids)
    workers = min(16, 4 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(_hash_file, paths, chunksize=64))
    return [(i, d) for i, d in zip(ids, digests, strict=True) if d is not None]


def _rank(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split), "") if split in SPLIT_ORDER else (len(SPLIT_ORDER), split)


def find_duplicates(hashes: Hashes) -> list[dict[str, str]]:
    """The exact copies across splits, one dict per (example, earlier split holding a copy).

    Splits are ordered train < val < test (others after, by name); each example of a later
    split whose digest occurs in an earlier one gives one row `split_a, id_a, split_b, id_b,
    digest` with split_a the earlier split and id_a its first example with that digest. So an
    image copied 100 times makes 100 rows, never 100 x 100, and copies inside one split (not
    leakage) make none. Rows are ordered by split_b, split_a, then id_b's position.
    """
    # digest -> split -> [(position, id)]
    where: dict[str, dict[str, list[tuple[int, str]]]] = collections.defaultdict(dict)
    for split in sorted(hashes, key=_rank):
        for pos, (example_id, d) in enumerate(hashes[split]):
            where[d].setdefault(split, []).append((pos, example_id))
    rows = []
    for d, per_split in where.items():
        if len(per_split) < 2:
            continue
        splits = sorted(per_split, key=_rank)
        for j, split_b in enumerate(splits[1:], start=1):
            for pos, id_b in per_split[split_b]:
                for split_a in splits[:j]:
                    key = (_rank(split_b), _rank(split_a), pos)
                    rows.append((key, (split_a, per_split[split_a][0][1], split_b, id_b, d)))
    rows.sort(key=lambda r: r[0])
    return [dict(zip(CSV_COLUMNS, values, strict=True)) for _, values in rows]


def write_leakage_csv(path: str | os.PathLike, pairs: Iterable[dict[str, str]]) -> str:
    """Writes `pairs` (as from `find_duplicates`) as CSV, atomically; the header alone if none."""
    with atomic_open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        out.writeheader()
        out.writerows(pairs)
    return os.fspath(path)


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def describe(pairs: Sequence[dict[str, str]]) -> str:
    """`1 example of test is an exact copy of one in train; 3 examples of val are ...`."""
    leaked: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for p in pairs:
        leaked[(p["split_b"], p["split_a"])].add(p["id_b"])
    parts = []
    for (split_b, split_a), ids in sorted(leaked.items(), key=lambda kv: tuple(map(_rank, kv[0]))):
        n = len(ids)
        if n == 1:
            parts.append(f"1 example of {split_b} is an exact copy of one in {split_a}")
        else:
            parts.append(f"{n} examples of {split_b} are exact copies of ones in {split_a}")
    return "; ".join(parts)


def num_leaked(pairs: Sequence[dict[str, str]]) -> int:
    """How many examples (of the later split) have an exact copy in an earlier split."""
    return len({(p["split_b"], p["id_b"]) for p in pairs})


def check(source: Any, run_dir: str | os.PathLike, on_leakage: str = "warn") -> int:
    """Hashes the source's splits, prints one line, writes `<run_dir>/leakage.csv`.

    Returns the number of examples that are exact copies of an example of an earlier split (0:
    clean). With on_leakage='refuse' and copies found, raises UsageError (exit 2) after writing
    the CSV. Every process hashes and decides alike, so all of them stop together; only process
    0 prints and writes.
    """
    if on_leakage not in ON_LEAKAGE_CHOICES:
        raise UsageError(f"data.on_leakage must be one of {ON_LEAKAGE_CHOICES}, not {on_leakage!r}")
    content_hashes = getattr(source, "content_hashes", None)
    hashes: Hashes = content_hashes() if content_hashes is not None else {}
    pairs = find_duplicates(hashes)
    path = os.path.join(os.fspath(run_dir), LEAKAGE_FILE)
    primary = workdir.is_primary()
    if primary:
        write_leakage_csv(path, pairs)
    total = sum(len(v) for v in hashes.values())
    splits = sorted(hashes, key=_rank)
    if pairs:
        line = f"leakage check: {describe(pairs)} (see {path})"
    elif not hashes:
        line = "leakage check: skipped, this data source has no example content to hash"
    elif len(splits) == 1:
        line = f"leakage check: only the {splits[0]} split, nothing to compare ({total} hashed)"
    else:
        line = f"leakage check: no duplicates between {_join(splits)} ({total} examples hashed)"
    if primary:
        print(line, flush=True)
    if pairs and on_leakage == "refuse":
        raise UsageError(
            f"{describe(pairs)} (see {path}): remove the copies from the held-out split, or "
            "run anyway with --config.data.on_leakage=warn"
        )
    return num_leaked(pairs)
