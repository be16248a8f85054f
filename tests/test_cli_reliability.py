"""The ``qaconv`` command loses nothing and says what is wrong: runs are never overwritten, ``--resume``
continues the run that was started, a diverged run or non-finite scores end with an error, and every
bad input gets one line (``qaconv <command>: ...``, exit status 2) before any work starts.

Most tests stop before training (a stand-in for ``run_training`` records what it was given); one
module-wide two-epoch run on a tiny Market-1501 tree serves those that need a checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

from helpers import fails, write_tiny_market
import pytest
import torch

import qaconv_ext.engine
from qaconv_ext import cli
from qaconv_ext.cli import common

Image = pytest.importorskip("PIL.Image")

H, W = 32, 16
SMALL = ["--arch", "small", "--neck", 16, "--height", H, "--width", W]
REPO = Path(__file__).resolve().parent.parent


def make_market(root: Path, train: bool = True, seed: int = 1) -> Path:
    """A tiny Market-1501 tree under ``root``: 6 training identities x 4 images (unless not ``train``),
    4 test identities with a query and two gallery images each."""
    return write_tiny_market(root / "Market-1501-v15.09.15", seed=seed, train_ids=range(1, 7),
                             test_ids=range(10, 14), size=(H, W), train=train)


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> str:
    return str(make_market(tmp_path_factory.mktemp("market")))


def train_args(market, *extra):
    """``train`` on the tiny tree with a tiny model, on the CPU, quietly."""
    return ["train", "--dataset", "market1501", "--data-root", market, *SMALL, "--workers", 0, "--device", "cpu",
            "--no-progress", *extra]


def _run(argv):
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def run2(tmp_path_factory, market) -> Path:
    """A finished two-epoch run: batch 8, lr 0.02, x0.1 after every epoch."""
    folder = tmp_path_factory.mktemp("run2") / "run"
    assert _run(train_args(market, "--epochs", 2, "--batch-size", 8, "--lr", 0.02, "--step-size", 1,
                           "--checkpoint-dir", folder)) == 0
    return folder


def copy_run(run: Path, dest: Path, epochs: int = None) -> Path:
    """A copy of ``run``'s folder; ``epochs``: what its config says the run was started for (as a run
    killed after its last saved epoch leaves it)."""
    shutil.copytree(run, dest)
    if epochs is not None:
        ck = torch.load(dest / "checkpoint.pt", weights_only=True)
        ck["config"]["epochs"] = epochs
        torch.save(ck, dest / "checkpoint.pt")
    return dest


class Started(Exception):
    """Raised by the stand-in for ``run_training``: every check before training passed."""


@pytest.fixture
def no_training(monkeypatch):
    """Replace ``run_training``; returns the dict of what the command passed to it."""
    seen = {}

    def fake(cfg, records, num_classes, **kw):
        seen.update(cfg=cfg, records=list(records), num_classes=num_classes, **kw)
        raise Started

    monkeypatch.setattr(qaconv_ext.engine, "run_training", fake)
    return seen


# ----------------------------------------------------------------------------------------------
# Runs are never overwritten
# ----------------------------------------------------------------------------------------------

def test_a_folder_holding_a_run_is_refused_without_resume(run2, market, tmp_path, capsys, no_training):
    folder = copy_run(run2, tmp_path / "run")
    before = (folder / "checkpoint.pt").read_bytes()
    line = fails(train_args(market, "--epochs", 1, "--batch-size", 4, "--checkpoint-dir", folder), capsys)
    assert f"{folder / 'checkpoint.pt'} already holds a run (epoch 2 of 2)" in line
    assert "--resume" in line and "--overwrite" in line
    assert (folder / "checkpoint.pt").read_bytes() == before
    with pytest.raises(Started):   # an explicit --overwrite starts a new run there
        _run(train_args(market, "--epochs", 1, "--batch-size", 4, "--checkpoint-dir", folder, "--overwrite"))
    assert no_training["checkpoint_dir"] == str(folder) and no_training["resume"] is None


def test_the_default_run_folder_is_new_for_every_run(market, tmp_path, monkeypatch, capsys):
    from qaconv_ext.cli.train import new_run_dir

    def fake(cfg, records, num_classes, checkpoint_dir, **kw):
        path = os.path.join(checkpoint_dir, "checkpoint.pt")
        Path(path).write_bytes(b"")
        return types.SimpleNamespace(checkpoint_path=path)

    monkeypatch.setattr(qaconv_ext.engine, "run_training", fake)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert _run(train_args(market, "--epochs", 1, "--batch-size", 4)) == 0
    runs = sorted((tmp_path / "runs" / "train").iterdir())
    assert len(runs) == 2 and all((r / "checkpoint.pt").is_file() for r in runs)
    out = capsys.readouterr().out
    assert all(f"run folder: {os.path.join('runs', 'train', r.name)} (new" in out for r in runs)
    # the same second twice: a suffix
    assert new_run_dir(str(tmp_path / "b"), "20250101-000000").endswith("20250101-000000")
    assert new_run_dir(str(tmp_path / "b"), "20250101-000000").endswith("20250101-000000-2")


def test_a_failed_new_run_leaves_no_empty_folder(market, tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Started):
        _run(train_args(market, "--epochs", 1, "--batch-size", 4))
    assert list((tmp_path / "runs" / "train").iterdir()) == []


def test_demo_refuses_an_output_folder_holding_a_training_run(run2, tmp_path, capsys):
    folder = copy_run(run2, tmp_path / "run")
    before = sorted(p.name for p in folder.iterdir())
    line = fails(["demo", "--out", folder, "--device", "cpu", "--no-progress",
                  "--data-root", tmp_path / "synthetic"], capsys)
    assert f"--out {folder} holds a training run ({folder / 'checkpoint.pt'}" in line
    assert sorted(p.name for p in folder.iterdir()) == before and not (tmp_path / "synthetic").exists()


# ----------------------------------------------------------------------------------------------
# --resume continues the run that was started
# ----------------------------------------------------------------------------------------------

def test_resume_takes_every_training_option_from_the_checkpoint(run2, market, tmp_path, capsys, no_training):
    folder = copy_run(run2, tmp_path / "run", epochs=3)   # a 3-epoch run stopped after epoch 2
    with pytest.raises(Started):
        _run(["train", "--resume", folder, "--device", "cpu", "--no-progress"])   # nothing else repeated
    cfg = no_training["cfg"]
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.step_size) == (3, 8, 0.02, 1)
    assert (cfg.arch, cfg.neck, cfg.height, cfg.width, cfg.workers, cfg.seed) == ("small", 16, H, W, 0, 0)
    assert (cfg.dataset, cfg.data_root) == ("market1501", os.path.abspath(market))
    assert no_training["resume"] == str(folder / "checkpoint.pt")
    assert no_training["checkpoint_dir"] == str(folder)   # continued in its own folder
    out = capsys.readouterr().out
    assert "from the checkpoint: --method qaconv --arch small" in out and "--batch-size 8" in out
    assert "--lr 0.02" in out and "--step-size 1" in out
    assert "batch_size=8, lr=0.02, step_size=1" in out   # the printed settings are the run's
    # ... and the learning rate printed is the restored scheduler's
    ck = torch.load(folder / "checkpoint.pt", weights_only=True)
    restored = {g["name"]: g["lr"] for g in ck["optimizer"]["param_groups"]}["new"]
    assert f"continuing after epoch 2 of 3: learning rate of new layers now {restored:g}" in out
    assert ck["scheduler"]["step_size"] == 1


def test_resume_continues_with_the_saved_batch_size_and_schedule(run2, tmp_path, capsys):
    folder = copy_run(run2, tmp_path / "run", epochs=3)
    assert _run(["train", "--resume", folder, "--device", "cpu", "--no-progress"]) == 0
    ck = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 3 and len(ck["history"]) == 3
    assert [h["batches"] for h in ck["history"]] == [3, 3, 3]          # 24 images, batch 8, every epoch
    assert ck["optimizer"]["param_groups"][1]["lr"] == pytest.approx(0.02 * 0.1 ** 3)
    assert (ck["config"]["epochs"], ck["config"]["batch_size"], ck["config"]["step_size"]) == (3, 8, 1)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(run2, market, tmp_path, capsys):
    """One epoch, then ``--resume --epochs 2`` with nothing else repeated: the same weights, class memory
    and optimiser state as the two epochs of ``run2`` in one go."""
    folder = tmp_path / "run"
    assert _run(train_args(market, "--epochs", 1, "--batch-size", 8, "--lr", 0.02, "--step-size", 1,
                           "--checkpoint-dir", folder)) == 0
    assert _run(["train", "--resume", folder, "--epochs", 2, "--device", "cpu", "--no-progress"]) == 0
    resumed = torch.load(folder / "checkpoint.pt", weights_only=True)
    straight = torch.load(run2 / "checkpoint.pt", weights_only=True)
    for part in ("model", "criterion"):
        assert resumed[part].keys() == straight[part].keys()
        for key, value in straight[part].items():
            assert torch.equal(resumed[part][key], value), (part, key)
    assert [g["lr"] for g in resumed["optimizer"]["param_groups"]] == \
        [g["lr"] for g in straight["optimizer"]["param_groups"]]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]


def test_resume_refuses_options_that_contradict_the_run(run2, market, tmp_path, capsys, no_training):
    folder = copy_run(run2, tmp_path / "run", epochs=3)
    before = (folder / "checkpoint.pt").read_bytes()
    line = fails(["train", "--resume", folder, "--device", "cpu", "--batch-size", 4, "--lr", 0.01,
                  "--step-size", 1, "--no-flip", "--neck", 16], capsys)
    assert "--batch-size: 8 in the checkpoint, 4 given" in line
    assert "--lr: 0.02 in the checkpoint, 0.01 given" in line
    assert "flips (--no-flip): on in the checkpoint, off given" in line
    assert "--step-size" not in line and "--neck" not in line   # given again, the same
    assert (folder / "checkpoint.pt").read_bytes() == before and not no_training
    line = fails(["train", "--resume", folder, "--dataset", "dukemtmcreid", "--device", "cpu"], capsys)
    assert "--dataset: market1501 in the checkpoint, dukemtmcreid given" in line


def test_resume_on_other_images_is_refused(run2, tmp_path, capsys, no_training):
    folder = copy_run(run2, tmp_path / "run", epochs=3)
    other = make_market(tmp_path / "other", seed=2)
    line = fails(["train", "--resume", folder, "--data-root", other, "--device", "cpu"], capsys)
    assert "the training data differ from the run's: images:" in line and str(other) in line


def test_epochs_extend_a_resumed_run_and_say_so(run2, tmp_path, capsys, no_training):
    folder = copy_run(run2, tmp_path / "run")
    with pytest.raises(Started):
        _run(["train", "--resume", folder, "--epochs", 5, "--device", "cpu"])
    assert no_training["cfg"].epochs == 5
    assert "--epochs 5 extends the run: it was started for 2 epochs and now ends after 5" in capsys.readouterr().out


@pytest.mark.parametrize("extra, expected", [
    ([], "is complete (2 of 2 epochs); give --epochs N (more than 2) to extend the run"),
    (["--epochs", 1], "--epochs 1: the run in {ck} has already done 2 epochs; give more than 2 to extend it"),
    (["--epochs", 2], "--epochs 2: the run in {ck} has already done 2 epochs"),
])
def test_resume_with_nothing_left_to_train_is_an_error(run2, tmp_path, capsys, no_training, extra, expected):
    folder = copy_run(run2, tmp_path / "run")
    line = fails(["train", "--resume", folder, *extra, "--device", "cpu"], capsys)
    assert expected.format(ck=folder / "checkpoint.pt") in line and not no_training


def test_resume_without_a_folder_says_what_to_give(capsys):
    line = fails(["train", "--resume", "--device", "cpu"], capsys)
    assert "--resume without PATH continues the run in --checkpoint-dir" in line


# ----------------------------------------------------------------------------------------------
# Divergence and non-finite scores end the command
# ----------------------------------------------------------------------------------------------

def test_a_diverging_run_exits_with_one_line(market, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = fails(train_args(market, "--epochs", 2, "--batch-size", 8, "--lr", 1e30), capsys, code=1)
    assert line.startswith("qaconv train: training diverged") and "epoch 1" in line
    assert not list((tmp_path / "runs" / "train").iterdir())   # nothing saved, no empty folder left


def _with_head(run: Path, dest: Path, **values) -> Path:
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    for key, value in values.items():
        ck["head"][key] = torch.full_like(ck["head"][key], value)
    torch.save(ck, dest)
    return dest


def test_eval_refuses_a_model_with_non_finite_weights(run2, market, tmp_path, capsys):
    path = _with_head(run2, tmp_path / "nan.pt", **{"fc.weight": float("nan")})
    line = fails(["eval", "--checkpoint", path, "--dataset", "market1501", "--data-root", market, "--device", "cpu",
                  "--workers", 0, "--no-progress"], capsys)
    assert f"{path}: 1 weight tensor(s) are not finite (NaN or Inf): head.fc.weight" in line


def test_eval_rejects_non_finite_scores(run2, market, tmp_path, capsys):
    path = _with_head(run2, tmp_path / "overflow.pt", **{"fc.weight": 3e38, "bn.weight": 3e38})   # finite weights
    line = fails(["eval", "--checkpoint", path, "--dataset", "market1501", "--data-root", market, "--device", "cpu",
                  "--workers", 0, "--no-progress", "--json", tmp_path / "r.json"], capsys, code=1)
    assert "the model's scores are not finite" in line and "distances are not finite (NaN or Inf)" in line
    assert not (tmp_path / "r.json").exists()


# ----------------------------------------------------------------------------------------------
# Bad input: one line before any work
# ----------------------------------------------------------------------------------------------

def _corrupt_copy(market: str, dest: Path, sub: str) -> Path:
    root = Path(shutil.copytree(market, dest / "Market-1501-v15.09.15"))
    bad = sorted((root / sub).iterdir())[0]
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return bad


def test_a_corrupt_training_image_is_named(market, tmp_path, capsys):
    bad = _corrupt_copy(market, tmp_path, "bounding_box_train")
    line = fails(train_args(str(tmp_path), "--epochs", 1, "--batch-size", 24, "--checkpoint-dir", tmp_path / "ck"),
                 capsys)   # one batch of every image: the first step reads it
    assert f"cannot read image {bad}" in line and "--skip-bad-images" in line


def test_skip_bad_images_skips_and_counts(market, tmp_path, capsys, no_training):
    bad = _corrupt_copy(market, tmp_path, "bounding_box_train")
    with pytest.raises(Started):
        _run(train_args(str(tmp_path), "--epochs", 1, "--batch-size", 4, "--checkpoint-dir", tmp_path / "ck",
                        "--skip-bad-images"))
    assert len(no_training["records"]) == 23 and str(bad) not in [r.path for r in no_training["records"]]
    assert f"skipped 1 unreadable image(s) of market1501: cannot read image {bad}" in capsys.readouterr().out


def test_eval_names_a_corrupt_query_image_or_skips_it(run2, market, tmp_path, capsys):
    bad = _corrupt_copy(market, tmp_path, "query")
    argv = ["eval", "--checkpoint", run2, "--dataset", "market1501", "--data-root", tmp_path, "--device", "cpu",
            "--workers", 0, "--no-progress"]
    assert f"cannot read image {bad}" in fails(argv, capsys)
    res = tmp_path / "r.json"
    assert _run([*argv, "--skip-bad-images", "--json", res]) == 0
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().out and res.is_file()


def test_an_empty_training_folder_is_named(tmp_path, capsys):
    root = make_market(tmp_path)
    for f in (root / "bounding_box_train").iterdir():
        f.unlink()
    line = fails(train_args(str(tmp_path), "--checkpoint-dir", tmp_path / "ck"), capsys)
    assert f"no images in {root / 'bounding_box_train'}" in line and not (tmp_path / "ck").exists()


def test_eval_reads_a_test_only_dataset_folder(run2, tmp_path, capsys):
    root = make_market(tmp_path, train=False)
    assert not (root / "bounding_box_train").exists()
    res = tmp_path / "r.json"
    assert _run(["eval", "--checkpoint", run2, "--dataset", "market1501", "--data-root", root, "--device", "cpu",
                 "--workers", 0, "--no-progress", "--json", res]) == 0
    assert list(json.loads(res.read_text())) == ["QAConv"]


def test_a_bad_pretrained_file_is_refused_before_training(market, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "weights.pth"
    notes.write_text("not weights\n")
    line = fails(train_args(market, "--pretrained", notes), capsys)
    assert line == f"qaconv train: --pretrained: pretrained weights: {notes} is not a PyTorch checkpoint"
    line = fails(train_args(market, "--pretrained", tmp_path / "missing.pth"), capsys)
    assert f"pretrained weights not found: {tmp_path / 'missing.pth'}" in line
    from qaconv_ext.models.resnet import resnet
    torch.save(resnet("resnet18").state_dict(), tmp_path / "r18.pth")   # weights of another trunk
    line = fails(train_args(market, "--pretrained", tmp_path / "r18.pth"), capsys)
    assert str(tmp_path / "r18.pth") in line and "wrong --arch for these weights?" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, says", [
    (["train", "--dataset", "market1501", "--lr", "-1"], "argument --lr: must be greater than 0, got -1"),
    (["train", "--dataset", "market1501", "--lr", "nan"], "argument --lr: must be a finite number, got 'nan'"),
    (["train", "--dataset", "market1501", "--lr", "inf"], "argument --lr: must be a finite number"),
    (["train", "--dataset", "market1501", "--workers", "-1"], "argument --workers: must be 0 or more, got -1"),
    (["eval", "--dataset", "market1501", "--workers", "-1"], "argument --workers: must be 0 or more"),
    (["demo", "--workers", "-1"], "argument --workers: must be 0 or more"),
    (["train", "--dataset", "market1501", "--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["demo", "--epochs", "0"], "argument --epochs: must be at least 1"),
    (["train", "--dataset", "market1501", "--step-size", "0"], "argument --step-size: must be at least 1"),
    (["train", "--dataset", "market1501", "--weight-decay", "-0.1"], "argument --weight-decay: must be 0 or more"),
    (["match", "a.jpg", "b.jpg", "-o", "x.txt"], "argument -o/--output: 'x.txt': a PNG or JPEG picture"),
    (["rank", "-o", "ranked"], "argument -o/--output: 'ranked': a PNG or JPEG picture"),
    (["eval", "--dataset", "market1501", "--json", "x.txt"], "argument --json: 'x.txt': JSON is written here"),
    (["bench", "--json", "x.png"], "argument --json: 'x.png': JSON is written here"),
    (["bench", "--queries", "0"], "argument --queries: must be at least 1"),
])
def test_out_of_range_options_are_refused_by_the_parser(argv, says, capsys):
    with pytest.raises(SystemExit) as err:
        _run(argv)
    assert err.value.code == 2 and says in capsys.readouterr().err


def test_a_batch_larger_than_the_data_is_refused_with_the_sizes(market, tmp_path, capsys, no_training):
    line = fails(train_args(market, "--batch-size", 25, "--checkpoint-dir", tmp_path / "ck"), capsys)
    assert f"--batch-size 25 is larger than the 24 training images of market1501 in {market}" in line
    assert not (tmp_path / "ck").exists() and not no_training


def test_an_unwritable_checkpoint_folder_is_refused_at_start(market, tmp_path, capsys, no_training):
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = fails(train_args(market, "--checkpoint-dir", blocker / "run"), capsys)
    assert f"--checkpoint-dir {blocker / 'run'}: {blocker} is a file, not a folder" in line
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        # root may write anywhere; /proc takes no new files from anyone
        target = locked / "run" if not os.access(locked, os.W_OK) else Path("/proc/qaconv-run")
        line = fails(train_args(market, "--checkpoint-dir", target), capsys)
    finally:
        locked.chmod(0o755)
    assert f"--checkpoint-dir {target}: cannot write there" in line and not no_training


def test_tlift_on_data_without_time_stamps_is_refused(run2, market, tmp_path, capsys, no_training):
    base = ["--device", "cpu", "--workers", 0, "--no-progress"]
    line = fails(["eval", "--checkpoint", run2, "--dataset", "folder", "--data-root", market, "--tlift", *base],
                 capsys)
    assert "--tlift: folder has no time stamps on 12 of its 12 query/gallery images" in line
    line = fails(train_args(market, "--batch-size", 4, "--checkpoint-dir", tmp_path / "ck", "--test-dataset",
                            "folder", "--test-root", market, "--rerank", "--tlift"), capsys)
    assert "--tlift: folder has no time stamps" in line and not no_training
    assert _run(["eval", "--checkpoint", run2, "--dataset", "market1501", "--data-root", market, "--tlift",
                 *base]) == 0   # Market-1501 has them


def test_library_errors_become_one_line_with_a_status(capsys):
    from qaconv_ext.data import DatasetFormatError, ImageReadError
    from qaconv_ext.engine import CheckpointError, TrainingDiverged
    from qaconv_ext.models import PretrainedWeightsError

    cases = [(TrainingDiverged("training diverged at epoch 3, step 2", 3, 2), 1),
             (PretrainedWeightsError("pretrained weights: w.pth is not a PyTorch checkpoint"), 2),
             (CheckpointError("c.pt is not a PyTorch checkpoint"), 2),
             (DatasetFormatError("Market-1501: no images in q/"), 2),
             (ImageReadError("cannot read image a.jpg: truncated"), 2)]
    for exc, code in cases:
        def func(args, exc=exc):
            raise exc
        with pytest.raises(SystemExit) as err:
            common.run_command(func, None, "qaconv eval")
        assert err.value.code == code and str(err.value).startswith(f"qaconv eval: {exc}")
        assert capsys.readouterr().err == f"{err.value}\n"
    with pytest.raises(ZeroDivisionError):   # a bug stays a traceback
        common.run_command(lambda args: 1 / 0, None, "qaconv eval")


# ----------------------------------------------------------------------------------------------
# Pictures go to runs/, help texts are plain and complete, --help does not load PyTorch
# ----------------------------------------------------------------------------------------------

def test_pictures_go_to_a_runs_folder(run2, market, tmp_path, monkeypatch, capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["rank"]).output == os.path.join("runs", "pictures", "ranked_list.png")
    assert parser.parse_args(["match", "a", "b"]).output == os.path.join("runs", "pictures", "correspondences.png")
    monkeypatch.chdir(tmp_path)
    query = sorted(Path(market, "query").iterdir())
    assert _run(["rank", "--checkpoint", run2, "--dataset", market, "-k", 2, "--max-gallery", 5]) == 0
    assert _run(["match", query[0], query[1], "--checkpoint", run2]) == 0
    assert sorted(os.listdir(tmp_path)) == ["runs"]
    assert sorted(os.listdir(tmp_path / "runs" / "pictures")) == ["correspondences.png", "ranked_list.png"]


def _subparsers():
    parser = cli.build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


@pytest.mark.parametrize("name", cli.SUBCOMMANDS)
def test_every_option_has_plain_help(name):
    sub = _subparsers()[name]
    missing = [a.option_strings or [a.dest] for a in sub._actions
               if a.help != "==SUPPRESS==" and not (a.help or "").strip()]
    assert not missing, f"{name}: options without help: {missing}"
    text = sub.format_help()
    assert "``" not in text and ":func:" not in text and "None" not in text, text
    assert (sub.description or "").strip()


def test_help_answers_without_importing_torch():
    code = ("import sys\nfrom qaconv_ext.cli import main\n"
            "for argv in ([], *([c, '--help'] for c in " + repr(cli.SUBCOMMANDS) + ")):\n"
            "    try:\n        main(['--help'] if not argv else argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'PIL')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_package_loads_torch_on_first_use():
    code = ("import sys, qaconv_ext\nassert 'torch' not in sys.modules\n"
            "assert qaconv_ext.__version__\nq = qaconv_ext.qaconv_match\nassert 'torch' in sys.modules\n"
            "assert qaconv_ext.engine.TrainConfig and qaconv_ext.QAConv and 'QAConv' in dir(qaconv_ext)\n"
            "from qaconv_ext import reference, evaluate_rank\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_run_options_are_train_config_fields():
    import dataclasses

    from qaconv_ext.cli.train import RUN_OPTIONS
    from qaconv_ext.config import TrainConfig

    assert set(RUN_OPTIONS) <= {f.name for f in dataclasses.fields(TrainConfig)}
