"""The leakage check between train, val and test: the pure parts, then each real source."""

import csv
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.data import leakage
from alexnet_jax.errors import UsageError


class FakeSource:
    def __init__(self, hashes):
        self.hashes = hashes

    def content_hashes(self):
        return self.hashes


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_find_duplicates_pairs_each_copy_with_its_earlier_split():
    hashes = {
        "test": [("t0", "aa"), ("t1", "bb"), ("t2", "aa"), ("t3", "zz")],
        "train": [("r0", "aa"), ("r1", "aa"), ("r2", "cc"), ("r3", "dd"), ("r4", "dd")],
        "val": [("v0", "cc"), ("v1", "aa")],
    }
    pairs = leakage.find_duplicates(hashes)
    rows = [(p["split_a"], p["id_a"], p["split_b"], p["id_b"], p["digest"]) for p in pairs]
    assert rows == [
        ("train", "r2", "val", "v0", "cc"),
        ("train", "r0", "val", "v1", "aa"),  # r0: the first of train's two copies
        ("train", "r0", "test", "t0", "aa"),
        ("train", "r0", "test", "t2", "aa"),
        ("val", "v1", "test", "t0", "aa"),
        ("val", "v1", "test", "t2", "aa"),
    ]
    # r3 and r4 are copies inside train: not leakage, not reported.
    assert leakage.num_leaked(pairs) == 4  # v0, v1, t0, t2
    assert leakage.describe(pairs) == (
        "2 examples of val are exact copies of ones in train; "
        "2 examples of test are exact copies of ones in train; "
        "2 examples of test are exact copies of ones in val"
    )


def test_no_pairs_for_empty_missing_or_single_splits():
    assert leakage.find_duplicates({}) == []
    assert leakage.find_duplicates({"train": [("a", "x")], "val": [], "test": []}) == []
    assert leakage.find_duplicates({"train": [("a", "x"), ("b", "x")]}) == []


def test_check_prints_one_line_and_writes_the_csv(tmp_path, capsys):
    clean = FakeSource({"train": [("a", "1"), ("b", "2")], "val": [("c", "3")], "test": []})
    assert leakage.check(clean, tmp_path) == 0
    assert capsys.readouterr().out == (
        "leakage check: no duplicates between train, val and test (3 examples hashed)\n"
    )
    assert read_csv(tmp_path / "leakage.csv") == [list(leakage.CSV_COLUMNS)]  # header only

    leaky = FakeSource({"train": [("a", "1"), ("b", "2")], "test": [("c", "2")]})
    assert leakage.check(leaky, tmp_path, "warn") == 1
    path = tmp_path / "leakage.csv"
    assert capsys.readouterr().out == (
        f"leakage check: 1 example of test is an exact copy of one in train (see {path})\n"
    )
    assert read_csv(path)[1:] == [["train", "b", "test", "c", "2"]]
    with pytest.raises(UsageError, match=r"1 example of test .*data.on_leakage=warn"):
        leakage.check(leaky, tmp_path, "refuse")
    assert len(read_csv(path)) == 2  # written before refusing: the user sees which
    assert [p.name for p in tmp_path.iterdir()] == ["leakage.csv"]  # no temporary file left


def test_check_options_and_sources_without_content(tmp_path, capsys):
    with pytest.raises(UsageError, match="on_leakage"):
        leakage.check(FakeSource({}), tmp_path, "ignore")
    assert leakage.ON_LEAKAGE_CHOICES == ("warn", "refuse")
    assert leakage.check(FakeSource({}), tmp_path, "refuse") == 0
    assert leakage.check(object(), tmp_path) == 0  # a source without content_hashes
    assert leakage.check(FakeSource({"train": [("a", "1")]}), tmp_path) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("leakage check: skipped") and lines[1] == lines[0]
    assert lines[2] == "leakage check: only the train split, nothing to compare (1 hashed)"


def test_synthetic_source_has_nothing_to_hash():
    from alexnet_jax.data.synthetic import SyntheticSource
    from experiments.imagenet import get_config

    c = get_config()
    c.dataset = "synthetic"
    assert SyntheticSource(c).content_hashes() == {}


def test_hash_files_skips_a_vanished_file(tmp_path, caplog):
    (tmp_path / "a").write_bytes(b"abc")
    rows = leakage.hash_files([str(tmp_path / "a"), str(tmp_path / "gone")], ["a", "gone"])
    assert rows == [("a", leakage.digest(b"abc"))] and "gone" in caplog.text


# --- digits ------------------------------------------------------------------------------------


def test_digits_splits_hold_no_exact_copies(tmp_path, capsys):
    from alexnet_jax.data.digits import DigitsSource
    from experiments.digits import get_config

    c = get_config()
    source = DigitsSource(c)
    hashes = source.content_hashes()
    assert {k: len(v) for k, v in hashes.items()} == source.info.num_examples
    ids = [int(i) for v in hashes.values() for i, _ in v]
    assert sorted(ids) == list(range(1797))  # every image once, by its load_digits() index
    # All 1,797 raw 8x8 images of scikit-learn's digits differ, so no split copies another.
    assert len({d for v in hashes.values() for _, d in v}) == 1797
    assert leakage.check(source, tmp_path, "refuse") == 0
    assert "no duplicates between train, val and test (1797 examples hashed)" in (
        capsys.readouterr().out
    )
    assert c.data.on_leakage == "warn"  # inherited from experiments/imagenet.py


# --- image folders -----------------------------------------------------------------------------


def png(color, seed):
    rng = np.random.default_rng(seed)
    array = np.clip(np.array(color) + rng.integers(-9, 10, (20, 24, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def folder_config(root):
    from experiments.imagenet import get_config

    c = get_config("folder")
    c.data.folder_root = str(root)
    c.data.resize_size, c.data.image_size = 32, 24
    return c


@pytest.fixture
def folder(tmp_path):
    """train: classes a and b; val: class a only; test: a copy of train/b/1.png among others."""
    root = tmp_path / "root"
    layout = {"train": {"a": 3, "b": 3}, "val": {"a": 2}, "test": {"a": 1, "b": 1}}
    seed = 0
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                seed += 1  # every image its own noise: no accidental copies
                (root / split / cls / f"{i}.png").write_bytes(png((9, 99, 199), seed))
    return root


def test_folder_copy_from_train_into_test_is_found(folder, tmp_path, capsys):
    from alexnet_jax.data.folder import FolderSource

    shutil.copy(folder / "train" / "b" / "1.png", folder / "test" / "b" / "copy.png")
    source = FolderSource(folder_config(folder))
    hashes = source.content_hashes()
    assert {k: len(v) for k, v in hashes.items()} == {"train": 6, "val": 2, "test": 3}
    workdir = tmp_path / "work"
    assert leakage.check(source, workdir) == 1
    path = workdir / "leakage.csv"
    assert capsys.readouterr().out == (
        f"leakage check: 1 example of test is an exact copy of one in train (see {path})\n"
    )
    assert read_csv(path)[1][:4] == ["train", "train/b/1.png", "test", "test/b/copy.png"]
    with pytest.raises(UsageError, match="exact copy"):
        leakage.check(source, workdir, "refuse")


def test_folder_with_an_empty_split_and_no_test_directory(folder, tmp_path, capsys):
    from alexnet_jax.data.folder import FolderSource

    shutil.rmtree(folder / "test")
    for f in (folder / "val" / "a").iterdir():
        f.unlink()  # val: a class directory without images
    hashes = FolderSource(folder_config(folder)).content_hashes()
    assert {k: len(v) for k, v in hashes.items()} == {"train": 6, "val": 0}
    assert leakage.check(FakeSource(hashes), tmp_path, "refuse") == 0
    assert "no duplicates between train and val (6 examples hashed)" in capsys.readouterr().out


# --- ImageNet, through the real TFDS builder ---------------------------------------------------


@pytest.fixture(scope="module")
def planted_imagenet(tmp_path_factory):
    """ILSVRC-shaped tars with one JPEG in both tars, prepared by the real builder."""
    import ilsvrc_fixtures as fx

    from alexnet_jax.data.imagenet import ImageNetSource
    from experiments.imagenet import get_config

    root = tmp_path_factory.mktemp("planted")
    tars = fx.write_ilsvrc_tars(root / "manual", duplicate=True)
    c = get_config()
    c.data.data_dir, c.data.manual_dir = str(root / "tfds"), str(root / "manual")
    c.data.resize_size, c.data.image_size = 32, 24
    c.data.train_split, c.data.val_split = "train[:80%]", "train[80%:]"  # test: validation
    c.data.use_prepared = False
    return tars, c, ImageNetSource(c)


def test_imagenet_reports_the_planted_copy_full_size_and_from_the_prepared_copy(
    planted_imagenet, tmp_path, monkeypatch, capsys, caplog
):
    from alexnet_jax.data import imagenet, prepare
    from alexnet_jax.data.imagenet import ImageNetSource

    tars, c, full = planted_imagenet
    train_file, val_file = tars.duplicate
    hashes = full.content_hashes()
    assert {k: len(v) for k, v in hashes.items()} == full.info.num_examples
    assert leakage.check(full, tmp_path) == 1
    (pair,) = leakage.find_duplicates(hashes)
    assert (pair["id_a"], pair["split_b"], pair["id_b"]) == (train_file, "test", val_file)
    assert pair["split_a"] in ("train", "val")  # where TFDS's record order put it
    assert f"1 example of test is an exact copy of one in {pair['split_a']}" in (
        capsys.readouterr().out
    )

    # `prepare` stores the digests of the original images next to the copy; a run reads them,
    # hashing nothing, and sees exactly what the full-size run saw.
    out = tmp_path / "prepared"
    copy_dir = prepare.prepare_copy(c.data, str(out))
    assert imagenet.hashes_path(copy_dir).exists()
    c.data.use_prepared, c.data.prepared_dir = True, str(out)
    copy = ImageNetSource(c)
    with monkeypatch.context() as m:
        m.setattr(imagenet, "hash_records", lambda *a: pytest.fail("rehashed"))
        assert copy.content_hashes() == hashes
        with pytest.raises(UsageError, match="exact copy"):
            leakage.check(copy, tmp_path, "refuse")

    # A sidecar that does not match the copy (here: cut short) is not trusted: the copy's own
    # records are hashed instead, re-encoded bytes, in which the copy is still a copy.
    path = imagenet.hashes_path(copy_dir)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    rehashed = copy.content_hashes()
    assert "does not match the copy" in caplog.text
    assert {k: [i for i, _ in v] for k, v in rehashed.items()} == {
        k: [i for i, _ in v] for k, v in hashes.items()
    }
    assert rehashed != hashes and len(leakage.find_duplicates(rehashed)) == 1

    # `prepare` run again on a copy without a sidecar (an older copy) hashes the originals once.
    path.unlink()
    assert prepare.prepare_copy(c.data, str(out)) == copy_dir and path.exists()
    assert copy.content_hashes() == hashes
