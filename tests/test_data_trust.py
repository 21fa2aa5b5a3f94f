"""Issue 10, the data path: imperfect files never give a silent wrong result, and bad input ends in one line.

Every case goes through the real CLI (`clipadapt.cli.main`, in-process) on a synthetic root damaged the
way users' roots are: a class missing from train, a repeated class name, a cut-off or non-image file,
impossible data flags.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from doubles import drop_train_class, edit_split, one_line_error, truncate

from clipadapt.cli import main
from clipadapt.data import write_synthetic
from clipadapt.data.images import FIX
from clipadapt.data.readers import read_splits
from clipadapt.data.synthetic import synthetic_classnames
from clipadapt.methods import LinearProbe

REPO = Path(__file__).resolve().parents[1]
NAMES = synthetic_classnames(6)  # raw names of the synthetic classes (prompts turn "_" into " ")


def cli(command: str, tmp_path: Path, *flags: str, config: str = "synthetic_probe.yaml") -> list[str]:
    """The arguments of `clipadapt <command>` with a config + the tiny overlay on the synthetic root under tmp_path."""
    return (
        [command, "--config", str(REPO / "configs" / config), "--config", str(REPO / "configs" / "tiny.yaml")]
        + ["--data.dataset", "synthetic", "--data.root", str(tmp_path / "data")]
        + ["--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "runs")]
        + ["--trainer.max_epochs", "1", *flags]
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_synthetic(tmp_path / "data", "synthetic")


def test_fit_refuses_a_class_without_train_images(tmp_path: Path, folder: Path):
    drop_train_class(folder, "synthetic", 2)
    message = one_line_error(cli("fit", tmp_path))
    assert message.startswith("clipadapt: error: synthetic (Synthetic): 1 training class(es) have no image")
    assert f"({folder / 'split_zhou_Synthetic.json'}): '{NAMES[2]}'" in message
    assert not list(tmp_path.glob("runs/**/*.ckpt"))  # refused before training


def test_zero_shot_test_keeps_every_class_under_its_own_name(tmp_path: Path, folder: Path):
    drop_train_class(folder, "synthetic", 2)  # labels 3, 4, 5 must keep their names
    main(cli("test", tmp_path, config="zeroshot.yaml"))
    (run,) = tmp_path.glob("runs/lightning_logs/version_*/test_metrics.json")
    assert yaml.safe_load((run.parent / "hparams.yaml").read_text())["classnames"] == [
        n.replace("_", " ") for n in NAMES
    ]
    assert json.loads(run.read_text())["test/synthetic/count"] == 6 * 4


def test_repeated_class_names_keep_their_own_rows_of_a_learned_head(tmp_path: Path, folder: Path):
    def rename(split: dict) -> None:
        for entries in split.values():
            for entry in entries:
                entry[2] = NAMES[1] if entry[1] == 4 else entry[2]  # class 4 takes class 1's name

    edit_split(folder, "synthetic", rename)
    main(cli("fit", tmp_path, "--test_after_fit", "false"))
    (ckpt,) = tmp_path.glob("runs/lightning_logs/version_*/checkpoints/*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    classnames, templates = state["hyper_parameters"]["classnames"], state["hyper_parameters"]["templates"]
    assert classnames[1] == classnames[4]
    probe = LinearProbe(classnames=classnames, templates=templates, arch="clipadapt-tiny", pretrained=None)
    probe.load_state_dict(state["state_dict"])
    head = probe.head.detach()
    assert not torch.allclose(head[1], head[4])  # trained on different images from one (text) start
    # the rows the run scores the training classes with: its own row for each, none merged into another
    torch.testing.assert_close(probe.class_embeddings(classnames, templates), F.normalize(head, dim=-1))


def test_data_check_decodes_every_image_and_lists_the_bad_ones(tmp_path: Path, folder: Path, capsys):
    splits = read_splits(tmp_path / "data", "synthetic")
    cut, empty = splits["train"][3].path, splits["test"][0].path
    truncate(cut)  # the header parses; only a decode finds it
    Path(empty).write_bytes(b"")
    with pytest.raises(SystemExit) as run:
        main(["data", "check", "--root", str(tmp_path / "data"), "--dataset", "synthetic"])
    message = run.value.code  # sys.exit(message): one line on stderr, exit status 1
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("clipadapt data check: 2 image(s) cannot be decoded (listed above)")
    out = capsys.readouterr().out
    assert "classes:  6" in out and "unreadable: 2 of 96 images cannot be decoded:" in out
    assert f"  {cut} (train split): OSError: image file is truncated" in out
    assert f"  {empty} (test split): UnidentifiedImageError" in out


def test_fit_checks_the_test_files_before_it_trains(tmp_path: Path, folder: Path):
    bad = read_splits(tmp_path / "data", "synthetic")["test"][5].path
    Path(bad).write_bytes(b"<html>404</html>")  # a failed download saved under the image's name
    message = one_line_error(cli("fit", tmp_path))
    assert message.startswith("clipadapt: error: 1 of 24 test images cannot be opened, so the test after training")
    assert f"first: {bad}; UnidentifiedImageError" in message and "clipadapt data check --root" in message
    assert not list(tmp_path.glob("runs/**/*.ckpt"))


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--data.seed", "-1"], "data.seed -1 cannot seed the run"),
        (["--seed_everything", "3", "--data.seed", "-1"], "data.seed must be 0 or more"),
        (["--data.batch_size", "0"], "data.batch_size must be 1 or more"),
        (["--data.eval_batch_size", "0"], "data.eval_batch_size must be 1 or more"),
        (["--data.num_workers", "-1"], "data.num_workers must be 0"),
    ],
)
def test_impossible_data_flags_end_in_one_line(tmp_path: Path, folder: Path, flags: list[str], expected: str):
    assert one_line_error(cli("fit", tmp_path, *flags)).startswith(f"clipadapt: error: {expected}")


def test_a_truncated_train_image_ends_in_the_same_line_with_and_without_workers(tmp_path: Path, folder: Path):
    cut = read_splits(tmp_path / "data", "synthetic")["train"][7].path
    truncate(cut)
    # the full train split (num_shots 0): every epoch reads the cut file
    lines = [one_line_error(cli("fit", tmp_path, "--data.num_shots", "0", "--data.num_workers", w)) for w in "02"]
    assert lines[0] == lines[1]
    assert lines[0].startswith(f"clipadapt: error: cannot read image {cut} (train split): OSError: image file is")
    assert lines[0].endswith(f"; {FIX}")  # what to do about it
