"""The launcher: overrides, their errors (exit 2, one line, no traceback), --dry_run."""

import os
import subprocess
import sys

import pytest

from alexnet_jax import cli
from alexnet_jax import config as config_lib
from alexnet_jax.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_overrides_parse_to_the_field_type():
    c = config_lib.load_config("experiments/imagenet.py")
    config_lib.apply_overrides(
        c,
        {
            "batch_size": "256",
            "optim.learning_rate": "0.02",
            "model.use_lrn": "false",
            "model.conv_features": "(1,2,3,4,5)",
            "data.train_split": "train[:10]",
            "optim.weight_decay": "0",
        },
    )
    assert c.batch_size == 256 and c.optim.learning_rate == 0.02 and c.model.use_lrn is False
    assert c.model.conv_features == (1, 2, 3, 4, 5) and c.data.train_split == "train[:10]"
    assert isinstance(c.optim.weight_decay, float)


def test_unknown_key_suggests_the_closest(capsys):
    code, _, err = _main(capsys, "experiments/digits.py", "--config.model.dropout=0.1")
    assert code == 2
    assert (
        err.strip()
        == "error: unknown config key 'model.dropout'; did you mean 'model.dropout_rate'?"
    )


COLUMNS, OWT = ["--config.parallel.mode=columns"], ["--config.parallel.mode=owt"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["experiments/nope.py"], "experiment file not found: experiments/nope.py"),
        (["experiments/digits.py", "--config.batch_size=big"], "expects an int, got 'big'"),
        (["experiments/digits.py", "--config.model.use_lrn=maybe"], "expects true or false"),
        (
            ["experiments/digits.py", "--config.model.dropout_rate=1.0"],
            "dropout_rate must be in [0, 1)",
        ),
        (
            ["experiments/digits.py", "--config.model.dropout_rate=-0.1"],
            "dropout_rate must be in [0, 1)",
        ),
        (["experiments/digits.py", "--config.batch_size=6"], "not divisible by the 4 devices"),
        (["experiments/digits.py", "--config.eval.crops=5"], "eval.crops must be one of 1, 10"),
        (["experiments/digits.py", "--config.model.init=bogus"], "model.init must be one of"),
        (["experiments/digits.py", "--config.optim.schedule=cosin"], "did you mean 'cosine'?"),
        (["experiments/digits.py", "--config.model.preset=bogus"], "model.preset must be"),
        (["experiments/digits.py", "--config.optim.update_rule=x"], "optim.update_rule must"),
        (["experiments/digits.py", "--config.model.dtype=int8"], "model.dtype must be one of"),
        (["experiments/digits.py", "--config.model.groups=3"], "model.groups=3 does not divide"),
        (["experiments/digits.py", "--config.data.image_size=7"], "image_size=7 is too small"),
        (
            ["experiments/digits.py", "--config.model.conv_features=(24,64,96)"],
            "must list the 5 conv layers' widths",
        ),
        (["experiments/digits.py", "--config.parallel.mode=model"], "parallel.mode must be"),
        (["experiments/digits.py", *COLUMNS, "--config.model.groups=1"], "model.groups=1 does"),
        (["experiments/digits.py", *COLUMNS, "--config.model.num_classes=9"], "odd widths: fc8=9"),
        (["experiments/digits.py", *COLUMNS, "--config.model.lrn_per_column=false"], "lrn_per_"),
        (["experiments/digits.py", *OWT, "--config.model.dropout_masks=device"], "needs model.dr"),
        (["experiments/digits.py", "--config.model.dropout_masks=x"], "dropout_masks must be"),
        (["experiments/digits.py", "--config.seed=-1"], "seed must be >= 0"),
        (["experiments/digits.py", "--config.keep_checkpoints=0"], "keep_checkpoints must be"),
        (["experiments/digits.py", "--config.optim.learning_rate=0"], "learning_rate must be"),
        (["experiments/digits.py", "--config.data.resize_size=32"], "resize_size=32 is smaller"),
        (["experiments/digits.py", "--config.data.val_fraction=-0.1"], "val_fraction must be"),
        (["experiments/digits.py", "--config.data.val_fraction=0.9"], "leaves no training"),
        (["experiments/digits.py", "--config.eval.crops=10"], "centre crops only"),
        (["experiments/digits.py:foo"], "digits.py:foo: unknown arg"),
        (["experiments/digits.py", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, message):
    code, _, err = _main(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_real_launcher_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "launch.py", "experiments/digits.py", "--config.nope=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: unknown config key 'nope'"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("groups", "total"), [(2, "60,965,224"), (1, "62,378,344")])
def test_dry_run_prints_the_parameter_table(capsys, groups, total):
    code, out, _ = _main(
        capsys, "experiments/imagenet.py", "--dry_run", f"--config.model.groups={groups}"
    )
    assert code == 0
    assert out.strip().splitlines()[-1] == f"Total parameters: {total}"
    assert "fc6/kernel" in out and '"batch_size": 128' in out


def test_default_workdir():
    assert cli.default_workdir("experiments/digits.py") == os.path.join("runs", "digits")
    assert cli.default_workdir("experiments/ablate.py:digits") == os.path.join(
        "runs", "ablate_digits"
    )


def test_config_key_with_space_separated_value():
    args, overrides = cli.parse_args(["experiments/digits.py", "--config.seed", "3", "--dry_run"])
    assert overrides == {"seed": "3"} and args.dry_run


def test_missing_value_is_an_error():
    with pytest.raises(UsageError, match="needs a value"):
        cli.parse_args(["experiments/digits.py", "--config.seed"])


def test_one_run_per_workdir_and_a_workdir_that_is_a_file(tmp_path, capsys):
    from alexnet_jax import workdir

    with workdir.locked(str(tmp_path)):  # as a running training would hold it
        code, _, err = _main(capsys, "experiments/digits.py", "--workdir", str(tmp_path))
    assert code == 2 and f"is in use by pid {os.getpid()}" in err and err.count("\n") == 1
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = _main(capsys, "experiments/digits.py", "--workdir", str(afile))
    assert code == 2 and "is a file, not a directory" in err
