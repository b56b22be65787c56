"""Human-readable names of the 1000 ILSVRC-2012 classes, for `--mode predict`.

TFDS's `imagenet2012` labels are WordNet synset ids ("n01440764"), with label i the i-th id in
sorted order. `imagenet_synsets.txt` (shipped next to this module) has one line per label, in that
order: `nXXXXXXXX name`. The names are Keras' `imagenet_class_index.json` (as copied to
pytorch/hub's `imagenet_classes.txt`), whose index order is the same sorted synset order; the
underscores are spaces here. Two names occur twice ("crane": the bird and the machine; "maillot"),
which is why predictions print the synset id as well.
"""

from __future__ import annotations

import functools
import os

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_synsets.txt")


@functools.cache
def synsets_and_names() -> tuple[tuple[str, str], ...]:
    """((synset, name), ...) in label order: entry i is TFDS label i."""
    with open(TABLE) as f:
        pairs = [line.rstrip("\n").split(" ", 1) for line in f if line.strip()]
    rows = tuple((synset, name) for synset, name in pairs)
    if len(rows) != 1000:
        raise RuntimeError(f"{TABLE} has {len(rows)} classes, not 1000")
    return rows


def class_names() -> tuple[str, ...]:
    """Display names in label order, e.g. "tench (n01440764)"."""
    return tuple(f"{name} ({synset})" for synset, name in synsets_and_names())


def name_of(synset: str) -> str:
    """The name of one synset id; a KeyError for an id that is not an ILSVRC-2012 class."""
    return dict(synsets_and_names())[synset]
