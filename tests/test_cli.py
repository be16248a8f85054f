"""The ``qaconv`` command line: sub-commands, train/resume/eval on a tiny Market-1501 tree, bench, demo hook."""
from __future__ import annotations

import json

from helpers import write_tiny_market
import pytest
import torch

from qaconv_ext import cli
from qaconv_ext.data import Market1501

Image = pytest.importorskip("PIL.Image")

H, W = 32, 16


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """A tiny Market-1501 tree: 6 training identities, 4 test identities (+ a distractor)."""
    root = tmp_path_factory.mktemp("market") / "Market-1501-v15.09.15"
    write_tiny_market(root, seed=1, train_ids=range(1, 7), test_ids=range(10, 14), size=(H, W), distractor=True)
    return str(root)


def _run(argv):
    return cli.main([str(a) for a in argv])


def test_parser_lists_subcommands():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(cli.SUBCOMMANDS) == {"train", "eval", "demo", "bench", "match", "rank",
                                                               "index", "search"}


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "train" in capsys.readouterr().out


def test_train_resume_eval(market, tmp_path, capsys):
    ck = tmp_path / "ck"
    common = ["--dataset", "market1501", "--data-root", market, "--arch", "small", "--neck", "16",
              "--height", H, "--width", W, "--batch-size", 8, "--workers", 0, "--device", "cpu", "--no-progress"]
    assert _run(["train", *common, "--epochs", 1, "--lr", 0.02, "--step-size", 1, "--checkpoint-dir", ck]) == 0
    first = torch.load(ck / "checkpoint.pt", weights_only=True)
    assert first["epoch"] == 1
    assert _run(["train", *common, "--epochs", 2, "--lr", 0.02, "--step-size", 1, "--checkpoint-dir", ck,
                 "--resume", "--test-dataset", "market1501", "--test-root", market]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "Rank-1" in out
    second = torch.load(ck / "checkpoint.pt", weights_only=True)
    assert second["epoch"] == 2 and second["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0002)
    rows = json.loads((ck / "results_market1501.json").read_text())
    assert set(rows["QAConv"]) == {"rank1", "rank5", "rank10", "mAP", "mINP", "queries", "queries_with_true_match"}

    res = tmp_path / "eval.json"
    assert _run(["eval", "--checkpoint", ck / "checkpoint.pt", "--dataset", "market1501", "--data-root", market,
                 "--device", "cpu", "--workers", 0, "--no-progress", "--rerank", "--tlift", "--json", res]) == 0
    rows = json.loads(res.read_text())
    assert list(rows) == ["QAConv", "QAConv + RR", "QAConv + RR + TLift"]
    for m in rows.values():
        assert 0.0 <= m["mAP"] <= 1.0 and m["rank1"] <= m["rank5"] <= m["rank10"]


def test_checkpoint_opens_in_the_picture_commands(market, tmp_path):
    """The checkpoint layout is what ``qaconv match``/``rank`` load; a baseline checkpoint is refused."""
    from qaconv_ext.cli import common

    ck = tmp_path / "ck"
    assert _run(["train", "--dataset", "market1501", "--data-root", market, "--arch", "small", "--neck", 16,
                 "--height", H, "--width", W, "--batch-size", 8, "--workers", 0, "--device", "cpu",
                 "--no-progress", "--epochs", 1, "--checkpoint-dir", ck]) == 0
    backbone, head, cfg = common.load_qaconv(str(ck / "checkpoint.pt"))
    assert cfg["height"] == H and head.layout == "v2" and not head.training
    assert (cfg["feature_height"], cfg["feature_width"]) == (H // 8, W // 8)
    bl = tmp_path / "bl"
    assert _run(["train", "--dataset", "market1501", "--data-root", market, "--arch", "small", "--neck", 16,
                 "--height", H, "--width", W, "--batch-size", 8, "--workers", 0, "--device", "cpu",
                 "--no-progress", "--epochs", 1, "--method", "baseline", "--checkpoint-dir", bl]) == 0
    with pytest.raises(SystemExit, match="baseline checkpoint"):
        common.load_qaconv(str(bl / "checkpoint.pt"))


def test_baseline_train_and_eval(market, tmp_path, capsys):
    ck = tmp_path / "bl"
    common = ["--dataset", "market1501", "--data-root", market, "--device", "cpu", "--workers", 0, "--no-progress"]
    assert _run(["train", *common, "--method", "baseline", "--arch", "small", "--neck", 16, "--height", H,
                 "--width", W, "--batch-size", 8, "--epochs", 1, "--checkpoint-dir", ck]) == 0
    res = tmp_path / "bl.json"
    capsys.readouterr()
    assert _run(["eval", "--checkpoint-dir", ck, *common, "--json", res]) == 0
    assert list(json.loads(res.read_text())) == ["Baseline (GAP + cosine)"]
    assert "note" not in capsys.readouterr().out
    assert _run(["eval", "--checkpoint-dir", ck, *common, "--rerank", "--tlift", "--json", res]) == 0
    assert list(json.loads(res.read_text())) == ["Baseline (GAP + cosine)"]
    assert "note: --rerank/--tlift apply to QAConv checkpoints" in capsys.readouterr().out


def test_eval_needs_a_checkpoint(market):
    with pytest.raises(SystemExit):
        _run(["eval", "--dataset", "market1501", "--data-root", market])


def test_bench_quick(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert _run(["bench", "--queries", 4, "--gallery", 16, "--channels", 16, "--height", 4, "--width", 2,
                 "--repeats", 1, "--json", out]) == 0
    rec = json.loads(out.read_text())
    assert set(rec["results"]) == {"fused score", "fused match", "reference score"}
    assert "pairs/s" in capsys.readouterr().out


def test_postprocessing_rows(market):
    """evaluate_qaconv adds the RR and RR + TLift rows (tiny random model); no time stamps, no TLift row."""
    from qaconv_ext import QAConv
    from qaconv_ext.evaluation import QACONV_ROW, RR_ROW, TLIFT_ROW, evaluate_qaconv, rank_metrics
    from qaconv_ext.models import build_backbone

    ds = Market1501(market)
    torch.manual_seed(0)
    backbone = build_backbone("small", neck=8).eval()
    head = QAConv(8, H // 8, W // 8).eval()
    kw = dict(height=H, width=W, rerank=True, tlift=True, progress=False)
    res = evaluate_qaconv(backbone, head, ds.query, ds.gallery, **kw)
    assert list(res.rows) == [QACONV_ROW, RR_ROW, TLIFT_ROW]
    P, N = len(ds.query), len(ds.gallery)
    assert {k: tuple(v.shape) for k, v in res.scores.items()} == {"qg": (P, N), "qq": (P, P), "gg": (N, N)}
    # The QAConv row is the ranking of the returned query-gallery scores.
    assert res.rows[QACONV_ROW] == rank_metrics(-res.scores["qg"], ds.query, ds.gallery)
    no_time = [r._replace(time=None) for r in ds.query]
    res = evaluate_qaconv(backbone, head, no_time, ds.gallery, **kw)
    assert list(res.rows) == [QACONV_ROW, RR_ROW]
    res = evaluate_qaconv(backbone, head, ds.query, ds.gallery, height=H, width=W, progress=False)
    assert list(res.rows) == [QACONV_ROW] and list(res.scores) == ["qg"]


def test_module_entry_point():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "qaconv_ext", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "qaconv-ext" in proc.stdout


# ----------------------------------------------------------------------------------------------
# Mistakes a new user makes: one clear line, before any training or data loading
# ----------------------------------------------------------------------------------------------

def _tiny(market, ck, *extra):
    """``train`` arguments for one epoch of a tiny model on the fixture (model options in ``extra``)."""
    return ["train", "--dataset", "market1501", "--data-root", market, "--batch-size", 8, "--workers", 0,
            "--device", "cpu", "--no-progress", "--epochs", 1, "--checkpoint-dir", ck, *extra]


SMALL = ["--arch", "small", "--neck", 16, "--height", H, "--width", W]


def test_test_dataset_is_checked_before_training(market, tmp_path, monkeypatch):
    monkeypatch.delenv("QACONV_DATA", raising=False)
    ck = tmp_path / "ck"
    with pytest.raises(SystemExit, match="cannot read msmt17"):   # --test-root defaults to --data-root
        _run(_tiny(market, ck, *SMALL, "--test-dataset", "msmt17"))
    assert not ck.exists()  # nothing was trained


def test_test_root_defaults_to_the_data_root_of_the_same_family():
    from qaconv_ext.cli.train import resolve_test_root

    parser = cli.build_parser()

    def root(train, test, *extra):
        return resolve_test_root(parser.parse_args(["train", "--dataset", train, "--data-root", "R",
                                                    "--test-dataset", test, *extra]))

    assert root("market1501", "msmt17") == "R" and root("synthetic-a", "synthetic-b") == "R"
    assert root("synthetic-a", "market1501") is None and root("market1501", "synthetic-b") is None
    assert root("market1501", "market1501", "--test-root", "T") == "T"


def test_resume_takes_the_model_options_from_the_checkpoint(market, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert _run(_tiny(market, ck, *SMALL)) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        _run(_tiny(market, ck, "--arch", "small", "--neck", 8, "--width", 2 * W, "--resume"))
    msg = str(err.value)
    assert "--neck: 16 in the checkpoint, 8 given" in msg and f"--width: {W} in the checkpoint, {2 * W} given" in msg
    assert "--arch" not in msg and "\n" not in msg and err.value.code == 2
    assert torch.load(ck / "checkpoint.pt", weights_only=True)["epoch"] == 1   # not touched
    # Not given: taken from the checkpoint (the defaults, resnet50 at 384 x 128, would not load).
    assert _run(_tiny(market, ck, "--resume", "--epochs", 2)) == 0
    assert "from the checkpoint: --method qaconv --arch small --neck 16 --layout v2" in capsys.readouterr().out
    cfg = torch.load(ck / "checkpoint.pt", weights_only=True)
    assert cfg["epoch"] == 2 and (cfg["config"]["arch"], cfg["config"]["height"]) == ("small", H)


def test_train_records_the_test_set_for_rank(market, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert _run(_tiny(market, ck, *SMALL, "--test-dataset", "market1501")) == 0   # root: --data-root
    cfg = torch.load(ck / "checkpoint.pt", weights_only=True)["config"]
    assert cfg["test_dataset"] == "market1501" and cfg["test_root"] == Market1501(market).root
    out = tmp_path / "r.png"
    capsys.readouterr()
    assert _run(["rank", "--checkpoint", ck, "-k", 2, "--max-gallery", 5, "-o", out]) == 0
    assert out.is_file() and "synthetic" not in capsys.readouterr().out


def test_rank_reads_the_recorded_test_set_with_its_type(market):
    from qaconv_ext.cli.rank import dataset_options, resolve_dataset
    from qaconv_ext.data import ImageFolderDataset

    assert isinstance(resolve_dataset(None, {"test_root": market, "test_dataset": "folder"}), ImageFolderDataset)
    assert isinstance(resolve_dataset(None, {"test_root": market}), Market1501)
    config = {"test_root": market, "test_dataset": "folder"}
    name, root = dataset_options(None, None, config, dataset_type="market1501")   # the deprecated --dataset-type
    assert (name, root) == ("market1501", market) and isinstance(resolve_dataset(name, config, root), Market1501)
    assert isinstance(resolve_dataset("market1501", config, market), Market1501)


@pytest.mark.parametrize("argv", [
    ["eval", "--checkpoint", "missing.pt", "--dataset", "market1501", "--data-root", "missing"],
    ["train", "--dataset", "market1501", "--data-root", "missing"],
    ["demo", "--out", "missing"],
    ["bench", "--queries", 1],
    ["match", "a.jpg", "b.jpg", "--checkpoint", "missing.pt"],
    ["rank", "--checkpoint", "missing.pt"],
])
def test_unavailable_device_is_one_line_up_front(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"--device cuda: CUDA is not available here .*; use --device cpu$"):
        _run([*argv, "--device", "cuda"])
    assert list(tmp_path.iterdir()) == []


def test_folder_without_checkpoint_pt_lists_its_files(tmp_path):
    from qaconv_ext.cli import common

    folder = tmp_path / "demo"
    folder.mkdir()
    for name in ("qaconv.pt", "baseline.pt", "results.json"):
        (folder / name).write_bytes(b"")
    expected = f"{folder} has no checkpoint.pt; it holds baseline.pt, qaconv.pt"
    with pytest.raises(SystemExit, match=expected):
        _run(["eval", "--checkpoint-dir", folder, "--dataset", "market1501", "--data-root", tmp_path])
    with pytest.raises(SystemExit, match=expected):
        common.load_qaconv(str(folder))
    with pytest.raises(SystemExit, match=expected):
        _run(["train", "--dataset", "market1501", "--data-root", tmp_path, "--checkpoint-dir", folder, "--resume"])


def test_a_file_that_is_no_checkpoint(tmp_path):
    notes = tmp_path / "README.md"
    notes.write_text("# not a checkpoint\n")
    for argv in (["eval", "--checkpoint", notes, "--dataset", "market1501", "--data-root", tmp_path],
                 ["rank", "--checkpoint", notes],
                 ["train", "--dataset", "market1501", "--data-root", tmp_path, "--resume", notes]):
        with pytest.raises(SystemExit) as err:
            _run(argv)
        assert str(err.value).endswith(f"{notes} is not a PyTorch checkpoint"), argv
        assert "weights_only" not in str(err.value)


@pytest.mark.parametrize("argv", [
    ["rank", "-k", 0], ["rank", "--max-gallery", 0], ["rank", "--max-gallery", -3], ["demo", "--arch", "foo"],
    ["rank", "--dataset-type", "market"], ["train", "--dataset", "market1501", "--height", 0],
])
def test_bad_values_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as err:
        _run(argv)
    assert err.value.code == 2 and "error:" in capsys.readouterr().err


def test_rank_dataset_type_matches_train_and_eval():
    parser = cli.build_parser()
    assert parser.parse_args(["rank", "--dataset-type", "duke"]).dataset_type == "dukemtmcreid"
    assert parser.parse_args(["rank", "--dataset-type", "dukemtmcreid"]).dataset_type == "dukemtmcreid"
    assert parser.parse_args(["rank"]).dataset_type is None


def test_eval_help_says_model_options_come_from_the_checkpoint():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = " ".join(sub.choices["eval"].format_help().split())
    assert text.count("(default: from the checkpoint)") == 5   # arch, neck, layout, height, width
    assert "backbone (default: from the checkpoint)" in text and "None" not in text
    train = " ".join(sub.choices["train"].format_help().split())
    assert "(default: resnet50)" in train and "(default: 384)" in train and "None" not in train


def test_train_settles_device_and_model_options_once(market, tmp_path, monkeypatch):
    """``qaconv train`` resolves the device and settles the model options once, before training."""
    import qaconv_ext.engine
    from qaconv_ext.cli import train

    calls = {"device": 0, "settle": 0}
    resolve, settle = train.resolve_device, train.settle_run_options

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    class Started(Exception):
        pass

    def no_training(cfg, *a, **k):
        assert (cfg.device, cfg.arch, cfg.height) == ("cpu", "small", H)
        raise Started

    monkeypatch.setattr(train, "resolve_device", count("device", resolve))
    monkeypatch.setattr(train, "settle_run_options", count("settle", settle))
    monkeypatch.setattr(qaconv_ext.engine, "run_training", no_training)
    with pytest.raises(Started):
        _run(_tiny(market, tmp_path / "ck", *SMALL))
    assert calls == {"device": 1, "settle": 1}
