"""Hostile inputs (issue 12): each is refused at the start with one line, or handled, never a
traceback after minutes of work and never a silently wrong number."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from alexnet_jax import cli
from alexnet_jax.data import base
from alexnet_jax.data.folder import FolderSource, find_unreadable
from alexnet_jax.errors import DataNotFoundError, UsageError
from tests.test_data_folder import COLORS, encode
from tests.test_data_folder import config as folder_config


def _folder(root, splits=("train", "val", "test")):
    rng = np.random.default_rng(0)
    for split in splits:
        for cls, color in COLORS.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                (d / f"{i}.jpg").write_bytes(encode(color, "JPEG", rng))
    return root


def test_an_empty_class_folder_is_named_at_start(tmp_path):
    root = _folder(tmp_path)
    (root / "train" / "yak").mkdir()
    with pytest.raises(DataNotFoundError, match=r"without images in .*'yak'"):
        FolderSource(folder_config(root))


def test_a_file_name_that_is_not_utf8_is_skipped_and_reported(tmp_path, caplog):
    root = _folder(tmp_path)
    raw = os.fsencode(root / "train" / "cat") + b"/caf\xe9.jpg"  # Latin-1, not UTF-8
    with open(raw, "wb") as f:
        f.write(encode(COLORS["cat"], "JPEG", np.random.default_rng(1)))
    name = os.fsdecode(raw)
    assert name in find_unreadable([name])
    source = FolderSource(folder_config(root))
    assert source.skipped["train"] == [name] and source.info.num_examples["train"] == 6


def test_a_missing_test_directory_is_refused_before_training(tmp_path, capsys):
    root = _folder(tmp_path, splits=("train", "val"))
    argv = [
        "experiments/imagenet.py:folder",
        "--workdir",
        str(tmp_path / "w"),
        f"--config.data.folder_root={root}",
        "--config.model.num_classes=3",
        "--config.batch_size=4",
        "--config.num_train_steps=1",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "the test split of dataset 'folder' is empty" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "w" / "checkpoints")  # refused before training


def test_a_global_batch_larger_than_the_training_split_is_refused(tmp_path, capsys):
    argv = ["experiments/digits.py", "--workdir", str(tmp_path), "--config.batch_size=4096"]
    assert cli.main(argv) == 2
    assert "larger than the training split" in capsys.readouterr().err


def test_get_config_that_returns_no_configdict_or_takes_no_argument(tmp_path, capsys):
    for body, message in (
        ("def get_config(arg=None):\n    return {'seed': 0}\n", "not an ml_collections"),
        ("def get_config():\n    return None\n", "must take one argument"),
    ):
        path = tmp_path / "exp.py"
        path.write_text(body)
        assert cli.main([str(path), "--dry_run"]) == 2
        assert message in capsys.readouterr().err


def test_predict_reads_16_bit_pngs_scaled_and_refuses_a_decompression_bomb(tmp_path):
    grey = np.array([[0, 32768, 65535]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = base.read_rgb(str(path))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 128, 255])  # convert('RGB') gives 0, 255, 255
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 50 MB of pixels, 50 KB on disk
    with pytest.raises(UsageError, match="pixels"):
        base.read_rgb(str(bomb))


def test_tensorflow_logs_do_not_surround_the_one_error_line(tmp_path):
    """Through the real launcher: TensorFlow is imported (the ImageNet source), its C++ and absl
    logs stay quiet, and stderr is exactly our line."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "experiments/imagenet.py",
            "--workdir",
            str(tmp_path / "w"),
            f"--config.data.data_dir={tmp_path}",
            f"--config.data.manual_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: ImageNet is not prepared") and out.stderr.count("\n") == 1
