"""``qaconv eval`` in 2 processes (gloo on the CPU): the same metrics as one process, bit for bit; only
rank 0 prints; options that differ across ranks stop every rank at start-up."""
from __future__ import annotations

import json
import os

from helpers import write_tiny_market
import pytest
import torch

import distributed_workers as workers
from qaconv_ext import cli

Image = pytest.importorskip("PIL.Image")

H, W = 32, 16


def assert_same_training(one: dict, two: dict) -> None:
    """The checkpoints ``one`` and ``two`` hold the same weights, class memory and head statistics (to
    float32 rounding) and the same first-epoch loss."""
    for part in ("model", "criterion"):
        for k, ref in one[part].items():
            got = two[part][k]
            if ref.is_floating_point():
                assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item()), f"{part}.{k}"
            else:
                assert torch.equal(got, ref), f"{part}.{k}"
    assert two["history"][0]["loss"] == pytest.approx(one["history"][0]["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Market-1501 tree (5 query, 11 gallery images: uneven shards) and a model trained 1 epoch on it."""
    base = tmp_path_factory.mktemp("dist_eval")
    root = base / "Market-1501-v15.09.15"
    write_tiny_market(root, seed=7, train_ids=range(1, 5), test_ids=range(10, 15), noise=25.0, size=(H, W),
                      distractor=True)
    ck = base / "ck"
    assert cli.main(_train_argv(str(root), ck)) == 0
    return str(root), str(ck / "checkpoint.pt")


def _train_argv(root, ck, *extra):
    return ["train", "--dataset", "market1501", "--data-root", root, "--arch", "small", "--neck", "8",
            "--height", str(H), "--width", str(W), "--batch-size", "8", "--workers", "0", "--device", "cpu",
            "--no-progress", "--epochs", "1", "--no-random-block", "--no-flip", "--checkpoint-dir", str(ck), *extra]


def _eval_argv(root, ck, json_path, dataset="market1501"):
    return ["eval", "--checkpoint", ck, "--dataset", dataset, "--data-root", root, "--device", "cpu",
            "--workers", "0", "--batch-size", "2", "--no-progress", "--rerank", "--tlift", "--json", str(json_path)]


def test_two_process_eval_equals_one_process(trained, tmp_path, capsys):
    root, ck = trained
    assert cli.main(_eval_argv(root, ck, tmp_path / "one.json")) == 0
    one_out = capsys.readouterr().out
    argv = _eval_argv(root, ck, tmp_path / "two.json")
    workers.spawn(workers.cli_worker, 2, str(tmp_path), [argv, argv])
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two.pop("world_size") == 2
    assert list(one) == ["QAConv", "QAConv + RR", "QAConv + RR + TLift"]
    assert two == one  # floats compared exactly
    rc0, out0 = (tmp_path / "rank0.out").read_text().split("\n", 1)
    rc1, out1 = (tmp_path / "rank1.out").read_text().split("\n", 1)
    assert rc0 == rc1 == "0"
    assert out1 == ""
    table = lambda text: [ln for ln in text.splitlines() if ln.startswith("QAConv")]  # noqa: E731
    assert table(out0) == table(one_out) and len(table(out0)) == 3
    assert "(2 processes)" in out0


def test_different_dataset_across_ranks_stops_at_start(trained, tmp_path):
    root, ck = trained
    argvs = [_eval_argv(root, ck, tmp_path / "r.json"), _eval_argv(root, ck, tmp_path / "r.json", "dukemtmcreid")]
    workers.spawn(workers.cli_worker, 2, str(tmp_path), argvs)
    for r in range(2):
        rc, out = (tmp_path / f"rank{r}.out").read_text().split("\n", 1)
        assert "different options" in rc and "dataset = 'market1501' / 'dukemtmcreid'" in rc
        assert "\n" not in rc
    assert not (tmp_path / "r.json").exists()


def test_two_process_training_matches_one_process_and_resumes(trained, tmp_path):
    """torchrun-style training of the same run (no augmentation, --sync-bn): one checkpoint, written by
    rank 0, that matches the one-process checkpoint; --resume continues on both ranks."""
    root, one_path = trained
    ck = tmp_path / "ck2"
    argv = _train_argv(root, ck, "--sync-bn")
    workers.spawn(workers.cli_worker, 2, str(tmp_path), [argv, argv])
    rc0, out0 = (tmp_path / "rank0.out").read_text().split("\n", 1)
    rc1, out1 = (tmp_path / "rank1.out").read_text().split("\n", 1)
    assert rc0 == rc1 == "0" and out1 == "" and "x 2 processes" in out0
    assert sorted(p.name for p in ck.iterdir()) == ["checkpoint.pt"]
    two = torch.load(ck / "checkpoint.pt", weights_only=True)
    one = torch.load(one_path, weights_only=True)
    assert two["config"]["world_size"] == 2 and two["config"]["sync_bn"] is True
    assert len(two["rng_ranks"]) == 2
    assert_same_training(one, two)

    argv = _train_argv(root, ck, "--sync-bn", "--resume")
    argv[argv.index("--epochs") + 1] = "2"
    workers.spawn(workers.cli_worker, 2, str(tmp_path), [argv, argv])
    assert (tmp_path / "rank0.out").read_text().split("\n", 1)[0] == "0"
    assert "resumed" in (tmp_path / "rank0.out").read_text()
    assert torch.load(ck / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_two_process_resume_continues_exactly_with_augmentation(trained, tmp_path):
    """Random Block and flips on: 2 epochs in one go equal 1 epoch + --resume, bit for bit (each rank
    restores its own RNG states)."""
    root, _ = trained

    def argv(ck, epochs, *extra):
        a = [x for x in _train_argv(root, ck, "--sync-bn", *extra) if x not in ("--no-random-block", "--no-flip")]
        a[a.index("--epochs") + 1] = str(epochs)
        return a

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for args in (argv(straight, 2), argv(resumed, 1), argv(resumed, 2, "--resume")):
        workers.spawn(workers.cli_worker, 2, str(tmp_path), [args, args])
        assert (tmp_path / "rank0.out").read_text().split("\n", 1)[0] == "0"
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for part in ("model", "criterion"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    r0, r1 = a["rng_ranks"]
    assert not torch.equal(r0["torch"], r1["torch"])  # the ranks draw their own augmentations


def test_two_process_training_shares_one_new_run_folder(trained, tmp_path, monkeypatch):
    """Without --checkpoint-dir, rank 0 makes the dated run folder and every rank uses it: one folder,
    one checkpoint."""
    root, _ = trained
    argv = [a for a in _train_argv(root, "unused") if a not in ("--checkpoint-dir", "unused")]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    workers.spawn(workers.cli_worker, 2, str(tmp_path), [argv, argv])
    rc0, out0 = (tmp_path / "rank0.out").read_text().split("\n", 1)
    rc1, out1 = (tmp_path / "rank1.out").read_text().split("\n", 1)
    assert rc0 == rc1 == "0" and out1 == ""
    runs = list((work / "runs" / "train").iterdir())
    assert len(runs) == 1 and sorted(p.name for p in runs[0].iterdir()) == ["checkpoint.pt"]
    assert f"run folder: {os.path.join('runs', 'train', runs[0].name)} (new" in out0


def test_two_process_gs_training_matches_one_process(trained, tmp_path):
    """The gs recipe across 2 ranks: the graph sampler's epoch (distances from rank 0) cut into the same
    global batches as in one process, so the checkpoint matches the one-process run's."""
    root, _ = trained
    gs = ["--recipe", "gs", "--augment", "eccv"]   # without random augmentations: one process = two
    one_ck, two_ck = tmp_path / "one", tmp_path / "two"
    assert cli.main(_train_argv(root, one_ck, *gs)) == 0
    argv = _train_argv(root, two_ck, *gs)
    workers.spawn(workers.cli_worker, 2, str(tmp_path), [argv, argv])
    rc0, out0 = (tmp_path / "rank0.out").read_text().split("\n", 1)
    rc1, out1 = (tmp_path / "rank1.out").read_text().split("\n", 1)
    assert rc0 == rc1 == "0" and out1 == "" and "x 2 processes" in out0
    one = torch.load(one_ck / "checkpoint.pt", weights_only=True)
    two = torch.load(two_ck / "checkpoint.pt", weights_only=True)
    assert two["config"]["recipe"] == "gs" and two["history"][0]["batches"] == one["history"][0]["batches"] == 4
    for k, v in one["sampler"].items():
        assert torch.equal(two["sampler"][k], v), k
    assert_same_training(one, two)


def _rows(path) -> dict:
    rows = json.loads(path.read_text())
    rows.pop("world_size", None)
    return rows


def test_two_process_sparse_rerank_holds_no_gallery_matrix_and_equals_one_process(trained, tmp_path, capsys):
    """``--rerank-mode sparse`` under torchrun: rank 0's re-ranking streams the gallery rows, no rank builds
    the gallery x gallery matrix, and the rows are those of one process."""
    root, ck = trained
    argv = lambda name: _eval_argv(root, ck, tmp_path / name) + ["--rerank-mode", "sparse"]  # noqa: E731
    assert cli.main(argv("one.json")) == 0
    capsys.readouterr()
    workers.spawn(workers.sparse_cli_worker, 2, str(tmp_path), argv("two.json"))
    for r in range(2):
        assert (tmp_path / f"rank{r}.out").read_text().split("\n", 1)[0] == "0"
        assert json.loads((tmp_path / f"matrices{r}.json").read_text()) == []   # no dense gallery-gallery call
    one, two = _rows(tmp_path / "one.json"), _rows(tmp_path / "two.json")
    assert list(one) == ["QAConv", "QAConv + RR", "QAConv + RR + TLift"] and two == one


def test_two_process_amp_eval_on_the_cpu_equals_one_process(trained, tmp_path, capsys):
    """``--amp`` (bfloat16 feature maps) under torchrun on the CPU: the rows of one process."""
    root, ck = trained
    argv = lambda name: _eval_argv(root, ck, tmp_path / name) + ["--amp"]  # noqa: E731
    assert cli.main(argv("one.json")) == 0
    capsys.readouterr()
    workers.spawn(workers.cli_worker, 2, str(tmp_path), [argv("two.json")] * 2)
    assert (tmp_path / "rank0.out").read_text().split("\n", 1)[0] == "0", (tmp_path / "rank0.out").read_text()
    assert _rows(tmp_path / "two.json") == _rows(tmp_path / "one.json")
