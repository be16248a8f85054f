"""The edges a new user meets, each tried as a user would: a damaged index never ranks a NaN, every JSON
the command line writes is valid, a test set without true matches and a search without queries are
plain answers, metrics say how many queries they count, an interrupted first epoch says how to start
again, the index's size and append messages count what is committed and appended (also when two
processes append at once), and a ranked-list picture has a size limit that is named."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import fails, put_market_views, save_tiny_checkpoint, write_tiny_market
from qaconv_ext import cli
from qaconv_ext.cli import common
from qaconv_ext.search import GalleryIndex, GalleryIndexError, NonFiniteScoresError
from qaconv_ext.search import storage

pytest.importorskip("PIL.Image")

D, H, W = 8, 32, 16          # the tiny model: 8 channels, 32 x 16 images (4 x 2 maps)
REPO = Path(__file__).resolve().parent.parent


def _run(argv):
    return cli.main([str(a) for a in argv])


def strict_json(path) -> object:
    """``path`` parsed as standard JSON (``NaN``/``Infinity`` refused)."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def _subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("QACONV_DATA", None)
    return env


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """A tiny Market-1501 tree (5 identities: a query on camera 1, two gallery images on camera 2, one
    training image each) and an untrained tiny QAConv checkpoint."""
    root = tmp_path_factory.mktemp("market")
    data = root / "Market-1501-v15.09.15"
    put_market_views(data, range(1, 6), [("query", 1), ("bounding_box_test", 2), ("bounding_box_test", 2),
                                          ("bounding_box_train", 1)], seed=3, noise=25, size=(H, W))
    return {"root": str(root), "data": data, "ck": save_tiny_checkpoint(root / "tiny.pt", 0, neck=D, height=H,
                                                                         width=W)}


def gallery_files(market) -> list:
    folder = market["data"] / "bounding_box_test"
    return [str(folder / f) for f in sorted(os.listdir(folder))]


# ----------------------------------------------------------------------------------------------
# 1. a damaged index never ranks a NaN; every JSON written is valid
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shortlist", [None, 5])
def test_a_damaged_index_ends_the_search_with_one_line(market, tmp_path, capsys, shortlist):
    idx = tmp_path / "archive.idx"
    GalleryIndex.build(idx, market["ck"], gallery_files(market), progress=False)
    maps = idx / storage.MAPS_FILE
    size = os.path.getsize(maps)
    with open(maps, "r+b") as fh:   # map 3 overwritten with NaN bytes, the file keeps its size
        fh.seek(3 * storage.map_nbytes((D, H // 8, W // 8)))
        fh.write(np.full(D * (H // 8) * (W // 8), np.nan, dtype="<f2").tobytes())
    assert os.path.getsize(maps) == size
    query = market["data"] / "query" / "0002_c1s1_000200_00.jpg"
    out = tmp_path / "ranked.json"
    argv = ["search", "--index", idx, query, "-k", 5, "--json", out, "--device", "cpu"]
    if shortlist:
        argv += ["--shortlist", shortlist]
    line = fails(argv, capsys, code=1)
    assert str(idx) in line and f"`qaconv index info --verify {idx}`" in line and "map 3" in line, line
    assert not out.exists()
    # the check it names finds the damage
    assert "maps.f16 is damaged" in fails(["index", "info", idx, "--verify"], capsys)


def test_search_refuses_queries_whose_scores_are_not_finite(tmp_path, gen):
    maps = torch.nn.functional.normalize(torch.randn(6, D, 4, 2, generator=gen), dim=1)
    index = GalleryIndex.create(tmp_path / "g.idx", (torch.ones(16), torch.tensor(0.0)), maps)
    q = maps[:2].clone()
    q[1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteScoresError, match="query map 1 holds NaN"):
        index.search(q, k=3)
    huge = maps[:1] * 6e4   # finite float16 maps whose float32 scores overflow
    big = GalleryIndex.create(tmp_path / "big.idx", (torch.full((16,), 1e30), torch.tensor(0.0)), huge.repeat(3, 1, 1, 1))
    with pytest.raises(NonFiniteScoresError, match=r"scores of query 0 .* are not finite \(map \d: they overflow"):
        big.search(huge, k=2)


def test_the_json_the_command_line_writes_is_valid(tmp_path):
    out = common.write_json(tmp_path / "r.json", {"mAP": float("nan"), "cmc": (1.0, float("inf"), -float("inf")),
                                                  "rows": [{"rank1": 0.5}]})
    assert strict_json(out) == {"mAP": None, "cmc": [1.0, None, None], "rows": [{"rank1": 0.5}]}


# ----------------------------------------------------------------------------------------------
# 2. no true match, no queries: plain answers
# ----------------------------------------------------------------------------------------------

def _no_features(monkeypatch):
    """Any feature extraction fails the test (the answer must come from the records)."""
    import qaconv_ext.evaluation.scoring as scoring

    def refuse(*a, **k):
        raise AssertionError("features were extracted")

    monkeypatch.setattr(scoring, "extract_features", refuse)


def test_a_test_set_without_true_matches_is_refused_from_its_records(market, tmp_path, capsys, monkeypatch):
    root = tmp_path / "same_camera"    # every gallery image of a query's identity is in the query's camera
    put_market_views(root / "Market-1501-v15.09.15", range(1, 4), [("query", 1), ("bounding_box_test", 1)],
                     seed=5, noise=25, size=(H, W))
    put_market_views(root / "Market-1501-v15.09.15", range(7, 9), [("bounding_box_test", 2)], seed=6, noise=25,
                     size=(H, W))
    _no_features(monkeypatch)
    line = fails(["eval", "--checkpoint", market["ck"], "--dataset", "market1501", "--data-root", root,
                  "--device", "cpu", "--workers", 0, "--no-progress"], capsys)
    assert "no query of market1501 has a true match in its gallery" in line and "3 queries, 5 gallery" in line, line


def test_train_checks_its_test_set_for_true_matches_before_training(tmp_path, capsys, monkeypatch):
    train = write_tiny_market(tmp_path / "train" / "Market-1501-v15.09.15", seed=1, train_ids=range(1, 7),
                              test_ids=range(10, 12), size=(H, W))
    test = tmp_path / "test" / "Market-1501-v15.09.15"
    put_market_views(test, range(1, 3), [("query", 1), ("bounding_box_test", 1)], seed=2, noise=25, size=(H, W))
    import qaconv_ext.engine

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(qaconv_ext.engine, "run_training", no_training)
    line = fails(["train", "--dataset", "market1501", "--data-root", train.parent, "--arch", "small", "--neck", D,
                  "--height", H, "--width", W, "--batch-size", 8, "--workers", 0, "--device", "cpu", "--no-progress",
                  "--checkpoint-dir", tmp_path / "run", "--test-dataset", "market1501", "--test-root", test.parent],
                 capsys)
    assert "no query of market1501 has a true match" in line, line


@pytest.mark.parametrize("shortlist", [None, 4])
def test_searching_no_queries_gives_empty_results(tmp_path, gen, shortlist):
    maps = torch.nn.functional.normalize(torch.randn(6, D, 4, 2, generator=gen), dim=1)
    index = GalleryIndex.create(tmp_path / "g.idx", (torch.ones(16), torch.tensor(0.0)), maps)
    scores, indices = index.search(torch.empty(0, D, 4, 2), k=3, shortlist=shortlist)
    assert scores.shape == (0, 3) and indices.shape == (0, 3) and indices.dtype == torch.int64


# ----------------------------------------------------------------------------------------------
# 3. metrics say how many queries they count
# ----------------------------------------------------------------------------------------------

def test_metrics_state_the_queries_they_count(market, tmp_path, capsys):
    root = tmp_path / "one"   # one query, a one-image gallery: every metric is 100
    put_market_views(root / "Market-1501-v15.09.15", [4], [("query", 1), ("bounding_box_test", 2)], seed=8,
                     noise=25, size=(H, W))
    out = tmp_path / "one.json"
    assert _run(["eval", "--checkpoint", market["ck"], "--dataset", "market1501", "--data-root", root,
                 "--device", "cpu", "--workers", 0, "--no-progress", "--rerank", "--tlift", "--json", out]) == 0
    text = capsys.readouterr().out
    assert ("1 query evaluated, 1 with a true match in the gallery (the metrics average over those 1); only 1: "
            "each moves Rank-1 by 100.0 points, so these numbers say little") in text, text
    rows = strict_json(out)
    assert list(rows) == ["QAConv", "QAConv + RR", "QAConv + RR + TLift"]
    assert all(r["queries"] == 1 and r["queries_with_true_match"] == 1 and r["rank1"] == 1.0 for r in rows.values())

    out = tmp_path / "five.json"   # 5 queries, 5 with a match: still few
    assert _run(["eval", "--checkpoint", market["ck"], "--dataset", "market1501", "--data-root", market["root"],
                 "--device", "cpu", "--workers", 0, "--no-progress", "--json", out]) == 0
    assert "5 queries evaluated, 5 with a true match" in capsys.readouterr().out
    assert strict_json(out)["QAConv"]["queries_with_true_match"] == 5


def test_query_counts_agree_with_the_metrics(rng):
    from qaconv_ext.data import Record
    from qaconv_ext.evaluation import evaluate_rank, query_counts

    q = [Record(f"q{i}", int(rng.integers(0, 8)), int(rng.integers(0, 3)), None) for i in range(40)]
    g = [Record(f"g{i}", int(rng.integers(0, 8)), int(rng.integers(0, 3)), None) for i in range(25)]
    counts = query_counts(q, g)
    ids = lambda rs: (np.array([r.pid for r in rs]), np.array([r.camid for r in rs]))  # noqa: E731
    (qp, qc), (gp, gc) = ids(q), ids(g)
    valid = sum(1 for i in range(len(q)) if ((gp == qp[i]) & (gc != qc[i])).any())
    assert counts == {"queries": 40, "queries_with_true_match": valid} and 0 < valid < 40
    # a query with a match only in its own camera does not count: dropping the others changes nothing
    dist = rng.random((len(q), len(g)))
    keep = [i for i in range(len(q)) if ((gp == qp[i]) & (gc != qc[i])).any()]
    cmc, mAP = evaluate_rank(dist, qp, gp, qc, gc)
    cmc2, mAP2 = evaluate_rank(dist[keep], qp[keep], gp, qc[keep], gc)
    assert mAP == pytest.approx(mAP2) and np.allclose(cmc, cmc2)


# ----------------------------------------------------------------------------------------------
# 4. an interrupted first epoch
# ----------------------------------------------------------------------------------------------

_PAUSE_IN_FIRST_STEP = """
import sys, time, torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

def pause(optimizer, args, kwargs):  # the first optimizer step of the run: say so, wait for the signal
    print("IN-EPOCH-1", flush=True)
    time.sleep(120)

register_optimizer_step_pre_hook(pause)
from qaconv_ext.cli import main
sys.exit(main())
"""


def test_sigint_in_the_first_epoch_says_how_to_start_again(tmp_path):
    data = write_tiny_market(tmp_path / "data" / "Market-1501-v15.09.15", seed=1, train_ids=range(1, 7),
                             test_ids=range(10, 12), size=(H, W))
    work = tmp_path / "work"
    work.mkdir()
    args = ["train", "--dataset", "market1501", "--data-root", str(data.parent), "--arch", "small", "--neck", str(D),
            "--height", str(H), "--width", str(W), "--batch-size", "8", "--epochs", "1", "--workers", "0",
            "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", _PAUSE_IN_FIRST_STEP, *args], cwd=work, env=_subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("IN-EPOCH-1"):
                break
        assert seen and seen[-1].startswith("IN-EPOCH-1"), "".join(seen) + proc.stderr.read()
        assert any(line.startswith("run folder: runs/train/") for line in seen), seen
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (proc.returncode, err)
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"qaconv train: interrupted in the first epoch, before any checkpoint: nothing was saved "
                     r"\(the new run folder (\S+) was removed\); start again with `(.+)`", last)
    assert m, err
    assert not (work / m.group(1)).exists() and os.listdir(work / "runs" / "train") == []
    command = shlex.split(m.group(2))
    assert command == ["qaconv", *args]
    # the command it gives starts the run again (and finishes it)
    done = subprocess.run([sys.executable, "-m", "qaconv_ext", *command[1:]], cwd=work, env=_subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    runs = os.listdir(work / "runs" / "train")
    assert len(runs) == 1 and (work / "runs" / "train" / runs[0] / "checkpoint.pt").is_file()


# ----------------------------------------------------------------------------------------------
# 5. the index's size, append counts, the user's path in errors
# ----------------------------------------------------------------------------------------------

def test_index_info_reports_the_committed_size_and_the_leftover_apart(market, tmp_path, capsys):
    idx = tmp_path / "archive.idx"
    index = GalleryIndex.build(idx, market["ck"], gallery_files(market), progress=False)
    files = [storage.MANIFEST, storage.MAPS_FILE, storage.DESCRIPTORS_FILE, storage.RECORDS_FILE]
    committed = sum(os.path.getsize(idx / f) for f in files)
    with open(idx / storage.MAPS_FILE, "ab") as fh:   # what a killed append leaves behind the committed end
        fh.write(b"\x01" * (3 << 20))
    assert GalleryIndex.open(idx).disk_usage() == (committed, 3 << 20)
    assert _run(["index", "info", idx]) == 0
    text = capsys.readouterr().out
    assert f"10 maps of 8 x 4 x 2 (float16), {committed / 2 ** 20:.1f} MiB committed" in text, text
    assert f"plus 3.0 MiB ({3 << 20} bytes) behind the committed end" in text, text
    assert index.disk_usage() == (committed, 3 << 20)


def _blocked_on(lock: Path) -> int:
    """How many processes wait for the flock on ``lock`` (from /proc/locks)."""
    inode = os.stat(lock).st_ino
    with open("/proc/locks") as fh:
        return sum(1 for line in fh if "->" in line and "FLOCK" in line
                   and int(line.split()[line.split().index("->") + 5].split(":")[2]) == inode)


def test_concurrent_appends_each_count_what_they_appended(market, tmp_path):
    import fcntl

    idx = tmp_path / "archive.idx"
    GalleryIndex.build(idx, market["ck"], gallery_files(market), progress=False)
    queries = sorted(str(p) for p in (market["data"] / "query").iterdir())
    train = sorted(str(p) for p in (market["data"] / "bounding_box_train").iterdir())
    lock = idx / storage.LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    procs = []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)   # both appends open the index, extract, then wait here
        for images in (queries[:2], train[:3]):
            procs.append(subprocess.Popen([sys.executable, "-m", "qaconv_ext", "index", "append", str(idx),
                                           "--images", *images, "--device", "cpu", "--no-progress"],
                                          env=_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        deadline = time.time() + 120
        while _blocked_on(lock) < 2:
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                [p.communicate() for p in procs if p.poll() is not None]
            time.sleep(0.05)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "appended 2 images" in outs[0][0] and "appended 3 images" in outs[1][0], outs
    first, second = sorted((int(re.search(r"now holds (\d+) maps", o).group(1)), n) for (o, _), n in zip(outs, (2, 3)))
    assert first[0] == 10 + first[1] and second[0] == 15, outs   # whichever committed first, then both
    assert len(GalleryIndex.open(idx, verify=True)) == 15


def test_errors_of_a_new_index_name_the_users_path(tmp_path):
    maps = torch.ones(3, D, 4, 2)
    maps[1, 0, 0, 0] = float("nan")
    target = tmp_path / "mine.idx"
    with pytest.raises(GalleryIndexError) as err:
        GalleryIndex.create(target, (torch.ones(16), torch.tensor(0.0)), maps)
    assert str(err.value).startswith(f"{target}: the maps to add hold NaN") and ".tmp" not in str(err.value)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# 6. ranked-list pictures have a named limit
# ----------------------------------------------------------------------------------------------

def test_rank_refuses_more_images_than_one_picture_shows(market, tmp_path, capsys):
    line = fails(["rank", "--checkpoint", market["ck"], "-k", 5000, "-o", tmp_path / "r.png"], capsys)
    assert line == (f"qaconv rank: -k 5000: one ranked-list picture shows at most {common.MAX_PICTURE_RANKS} "
                    f"gallery images; give -k {common.MAX_PICTURE_RANKS} or less")
    assert not (tmp_path / "r.png").exists()
    line = fails(["search", "--index", tmp_path / "none.idx", market["data"] / "query" / "0001_c1s1_000100_00.jpg",
                  "-k", 101, "-o", tmp_path / "s.png"], capsys)
    assert f"at most {common.MAX_PICTURE_RANKS} gallery images" in line and "leave out -o" in line


# ----------------------------------------------------------------------------------------------
# 7. one flag convention; the documented command lines run as written after `make demo`
# ----------------------------------------------------------------------------------------------

#: Real datasets: command lines that read them need the data (and, for training, hours).
_REAL_DATASETS = ("market1501", "dukemtmcreid", "msmt17")


def needs_real_data(argv) -> bool:
    """A documented command line that trains or evaluates on a real dataset (or continues such a run)."""
    named = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--dataset"]
    return any(n in _REAL_DATASETS for n in named) or "--resume" in argv


def _image(path: Path, color, rng) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.clip(np.asarray(color) + rng.normal(0, 20, size=(128, 64, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)


@pytest.fixture
def demo_folder(tmp_path, monkeypatch):
    """A folder laid out as `make demo` leaves it: `runs/demo/qaconv.pt` (a tiny model recording its test
    set as the demo does) and `data_cache/synthetic/domain_b` holding the images the docs name (and a
    few more: 8 identities, a query on camera 5 and two gallery images on cameras 3 and 6 each)."""
    rng = np.random.default_rng(11)
    synthetic = tmp_path / "data_cache" / "synthetic"
    b = synthetic / "domain_b"
    for n, pid in enumerate([1576, 1523, 1601, 1610, 1622, 1630, 1647, 1655]):
        color = rng.integers(0, 255, size=3)
        frame = 64426 if pid == 1576 else 60000 + 10 * n
        _image(b / "query" / f"{pid:04d}_c5s2_{frame:06d}_01.jpg", color, rng)
        _image(b / "bounding_box_test" / (f"{pid:04d}_c3s2_057104_01.jpg" if pid == 1576 else
                                          f"{pid:04d}_c3s2_{frame - 7000:06d}_01.jpg"), color, rng)
        _image(b / "bounding_box_test" / f"{pid:04d}_c6s1_{frame - 9000:06d}_02.jpg", color, rng)
    ck = tmp_path / "runs" / "demo" / "qaconv.pt"
    ck.parent.mkdir(parents=True)
    save_tiny_checkpoint(ck, 0, neck=D, height=H, width=W)
    state = torch.load(ck, weights_only=True)
    state["config"].update(test_dataset="synthetic-b", test_root=str(b), synthetic_root=str(synthetic))
    torch.save(state, ck)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QACONV_DATA", raising=False)
    return tmp_path


def test_documented_command_lines_run_as_written_after_the_demo(demo_folder, capsys):
    from test_docs import _commands, _qaconv_argv

    ran, left = [], []
    for doc, command in _commands():
        argv = _qaconv_argv(command)
        if command.startswith("torchrun") or needs_real_data(argv):
            left.append(argv)
            continue
        try:
            rc = _run(argv)
        except SystemExit as exc:
            pytest.fail(f"{doc.name}: `{command}` ended with {exc.code}: {capsys.readouterr().err}")
        assert rc == 0, (doc.name, command)
        ran.append(argv[0])
    assert all(argv[0] in ("train", "eval") for argv in left), left
    assert {"match", "rank", "index", "search"} <= set(ran) and len(ran) >= 13, ran
    assert (demo_folder / "archive.idx" / "manifest.json").is_file() and (demo_folder / "ranked_top1.png").is_file()


def test_the_picture_commands_find_the_demo_model_from_a_subfolder(demo_folder, capsys):
    sub = demo_folder / "notes" / "today"
    sub.mkdir(parents=True)
    os.chdir(sub)
    assert _run(["rank", "--query-index", 5, "-k", 3, "-o", "ranked.png"]) == 0
    assert (sub / "ranked.png").is_file()
    assert _run(["match", demo_folder / "data_cache/synthetic/domain_b/query/1576_c5s2_064426_01.jpg",
                 demo_folder / "data_cache/synthetic/domain_b/bounding_box_test/1576_c3s2_057104_01.jpg",
                 "-o", "pair.png"]) == 0
    os.chdir(demo_folder.parent)   # nothing above: the message says where it looked and what to do
    line = fails(["rank"], capsys)
    assert f"no {os.path.join('runs', 'demo', 'qaconv.pt')} in {demo_folder.parent} or a folder above it" in line


@pytest.mark.parametrize("old, new, note", [
    (["--dataset", "{b}"], ["--dataset", "market1501", "--data-root", "{b}"],
     "--dataset FOLDER is deprecated and will be removed; use --dataset market1501 --data-root {b}"),
    (["--dataset", "{b}", "--dataset-type", "folder"], ["--dataset", "folder", "--data-root", "{b}"],
     "--dataset FOLDER is deprecated and will be removed; use --dataset folder --data-root {b}"),
    (["--dataset", "synthetic:domain_b"], ["--dataset", "synthetic-b"],
     "--dataset synthetic:domain_b is deprecated and will be removed; use --dataset synthetic-b"),
    (["--dataset-type", "market1501"], ["--dataset", "market1501", "--data-root", "{b}"],
     "--dataset-type TYPE is deprecated and will be removed; use --dataset market1501 --data-root {b}"),
])
def test_old_rank_spellings_still_work_and_say_they_are_deprecated(demo_folder, capsys, old, new, note):
    b = str(demo_folder / "data_cache" / "synthetic" / "domain_b")
    fill = lambda argv: [a.format(b=b) for a in argv]  # noqa: E731
    common_args = ["--query-index", 1, "-k", 3, "--max-gallery", 6]
    assert _run(["rank", *fill(old), *common_args, "-o", "old.png"]) == 0
    err = capsys.readouterr().err
    assert err.strip() == f"qaconv rank: note: {note.format(b=b)}", err
    assert _run(["rank", *fill(new), *common_args, "-o", "new.png"]) == 0
    assert capsys.readouterr().err == ""
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open("old.png")), np.asarray(Image.open("new.png")))


def test_synthetic_root_is_the_deprecated_data_root(demo_folder, capsys, monkeypatch):
    from qaconv_ext.cli import rank

    seen = []
    monkeypatch.setattr(rank, "load_dataset", lambda name, root, **kw: seen.append((name, root)) or
                        pytest.fail("stop"))
    with pytest.raises(pytest.fail.Exception):
        _run(["rank", "--dataset", "synthetic-a", "--synthetic-root", "elsewhere"])
    assert seen == [("synthetic-a", "elsewhere")]
    assert "--synthetic-root DIR is deprecated and will be removed; use --data-root DIR" in capsys.readouterr().err
