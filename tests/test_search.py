"""Gallery index and search: exact streaming top-k (ties included), two-stage search, interrupted
writes, damaged or foreign indexes, and the ``qaconv index``/``qaconv search`` commands."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from helpers import pair_order, put_market_views, save_tiny_checkpoint, uneven_head
from qaconv_ext import QAConv, qaconv_score
from qaconv_ext import cli
from qaconv_ext.search import (
    GalleryIndex,
    GalleryIndexError,
    descriptor_topk,
    global_descriptors,
    merge_topk,
    rerank_shortlist,
    select_topk,
    streaming_topk,
)
from qaconv_ext.search import index as index_module
from qaconv_ext.search import storage

Image = pytest.importorskip("PIL.Image")

D, FH, FW = 8, 4, 2          # map shape of the tests (channels, height, width)
IMG_H, IMG_W = 32, 16        # image size of the tiny model (the small backbone's stride is 8)


def unit(n: int, gen: torch.Generator, shape=(D, FH, FW)) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, *shape, generator=gen), dim=1)


def make_head(seed: int = 0) -> QAConv:
    return uneven_head(D, FH, FW, seed)


def dense_topk(q: torch.Tensor, g: torch.Tensor, head: QAConv, k: int):
    """The reference: a stable descending sort of the dense scores (ties by the smaller index)."""
    w, b = head.folded()
    s = qaconv_score(q, g, w.detach(), b.detach())
    ref = torch.sort(s, dim=1, descending=True, stable=True)
    return s, ref.values[:, :k], ref.indices[:, :k]


def gallery_with_ties(gen: torch.Generator, n: int = 90) -> torch.Tensor:
    """Unit maps where several indices hold the very same map (equal scores), across chunk borders."""
    g = unit(n, gen)
    for copy in (7, 8, 31, 63, 64, 89):
        g[copy] = g[5]
    g[40] = g[41] = g[42]
    return g


# ----------------------------------------------------------------------------------------------
# streaming top-k
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 7, 32, 90])
@pytest.mark.parametrize("k", [1, 6, 90])
def test_streaming_topk_equals_dense_sort_ties_included(chunk, k):
    gen = torch.Generator().manual_seed(1)
    g = gallery_with_ties(gen)
    q = torch.cat([unit(4, gen), g[5:6], g[42:43]])  # two queries whose best match is a tied group
    head = make_head()
    s, ref_v, ref_i = dense_topk(q, g, head, k)
    w, b = head.folded()
    v, i = streaming_topk(q, (g[a:a + chunk] for a in range(0, g.shape[0], chunk)), w.detach(), b.detach(), k)
    assert torch.equal(v, ref_v) and torch.equal(i, ref_i)
    assert torch.equal(v, torch.topk(s, k, dim=1).values)
    if k >= 7:  # the tied copies of map 5 come out in index order
        row = i[4].tolist()
        assert [x for x in row if x in (5, 7, 8, 31, 63, 64, 89)] == [5, 7, 8, 31, 63, 64, 89][:len(
            [x for x in row if x in (5, 7, 8, 31, 63, 64, 89)])]


def test_streaming_topk_all_equal_scores_keep_index_order():
    gen = torch.Generator().manual_seed(2)
    g, q = unit(50, gen), unit(3, gen)
    w, b = torch.zeros(2 * FH * FW), torch.tensor(0.25)  # every score is the bias
    v, i = streaming_topk(q, torch.split(g, 9), w, b, 12)
    assert torch.equal(i, torch.arange(12).expand(3, 12)) and bool((v == 0.25).all())


def test_select_topk_orders_by_score_then_index():
    v = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    i = torch.tensor([[9, 7, 2, 4, 5]])
    sv, si = select_topk(v, i, 4)
    assert si.tolist() == [[2, 5, 7, 4]] and sv.tolist() == [[3.0, 3.0, 3.0, 2.0]]


@pytest.mark.parametrize("k", [1, 3, 8])
def test_merging_blocks_equals_one_sort_with_ties_and_nan(k):
    """Blocks merged one by one (each pre-selected by its k-th value) give the order of one stable sort."""
    gen = torch.Generator().manual_seed(11)
    values = torch.randint(0, 6, (5, 40), generator=gen).float()  # many ties
    values[1, [3, 17, 30]] = float("nan")
    values[2, :] = float("nan")
    values[3, [0, 9]] = -float("inf")
    ref = torch.sort(values, dim=1, descending=True, stable=True)
    run_v, run_i = torch.empty(5, 0), torch.empty(5, 0, dtype=torch.int64)
    for a in range(0, 40, 7):
        block = values[:, a:a + 7]
        run_v, run_i = merge_topk(run_v, run_i, block, torch.arange(a, a + block.shape[1]).expand(5, -1), k)
    assert torch.equal(run_i, ref.indices[:, :k])
    assert torch.equal(run_v.nan_to_num(nan=99.0), ref.values[:, :k].nan_to_num(nan=99.0))


def test_streaming_topk_k_larger_than_the_source():
    gen = torch.Generator().manual_seed(3)
    head = make_head()
    w, b = head.folded()
    with pytest.raises(ValueError, match=r"k=11 is larger than the gallery \(10 maps\)"):
        streaming_topk(unit(2, gen), [unit(4, gen), unit(6, gen)], w.detach(), b.detach(), 11)


# ----------------------------------------------------------------------------------------------
# the index on disk
# ----------------------------------------------------------------------------------------------

def records(n: int, start: int = 0):
    return [{"path": f"/archive/{i:05d}.jpg", "pid": i % 7, "camid": i % 3, "time": 10.0 * i}
            for i in range(start, start + n)]


@pytest.fixture
def built(tmp_path):
    gen = torch.Generator().manual_seed(4)
    g = gallery_with_ties(gen)
    head = make_head()
    index = GalleryIndex.create(tmp_path / "g.idx", head, g[:60], records(60))
    return index, head, g, gen


def test_a_head_with_non_finite_weights_is_refused_and_nothing_is_written(tmp_path):
    gen = torch.Generator().manual_seed(6)
    head = make_head()
    with torch.no_grad():
        head.fc.weight[0, 3] = float("nan")
    with pytest.raises((GalleryIndexError, ValueError), match="not finite"):
        GalleryIndex.create(tmp_path / "nan.idx", head, unit(4, gen), records(4))
    assert os.listdir(tmp_path) == []


def test_index_stores_plain_json_and_float16_maps(built):
    index, head, g, _ = built
    assert len(index) == 60 and index.map_shape == (D, FH, FW)
    names = set(os.listdir(index.path)) - {".lock"}
    assert names == {"descriptors.f32", "maps.f16", "manifest.json", "records.jsonl"}
    manifest = json.loads(open(os.path.join(index.path, "manifest.json")).read())
    w, b = head.folded()
    assert manifest["count"] == 60 and manifest["model"]["head"]["weight"] == [float(x) for x in w.tolist()]
    assert os.path.getsize(os.path.join(index.path, "maps.f16")) == 60 * D * FH * FW * 2
    raw = np.fromfile(os.path.join(index.path, "maps.f16"), dtype="<f2").reshape(60, D, FH, FW)
    assert np.array_equal(raw, g[:60].half().numpy()) and np.array_equal(index.maps(), raw)
    assert np.allclose(index.descriptors(), global_descriptors(torch.from_numpy(raw)).numpy())
    assert index.records[3].path == "/archive/00003.jpg" and index.records[3].time == 30.0
    assert (index.records[3].pid, index.records[3].camid) == (3, 0)


@pytest.mark.parametrize("chunk", [None, 1, 13])
def test_index_search_equals_dense_topk_after_append(built, chunk):
    index, head, g, gen = built
    index.append(g[60:], records(30, 60))
    assert len(GalleryIndex.open(index.path)) == 90 and index.records[75].path == "/archive/00075.jpg"
    q = torch.cat([unit(3, gen), g[5:6]])
    _, ref_v, ref_i = dense_topk(q, g.half().float(), head, 9)
    v, i = index.search(q, k=9, chunk=chunk)
    assert torch.equal(v, ref_v) and torch.equal(i, ref_i)
    assert i[3, :7].tolist() == [5, 7, 8, 31, 63, 64, 89]  # the tied copies, by index


def score_dtypes(monkeypatch) -> list:
    """The (query, gallery) dtypes of every call of the score op from now on (a list that fills up)."""
    seen = []
    real = torch.ops.qaconv_ext.score

    def spy(query, gallery, *args):
        seen.append((query.dtype, gallery.dtype))
        return real(query, gallery, *args)

    monkeypatch.setattr(torch.ops.qaconv_ext, "score", spy)
    return seen


def test_float16_queries_score_the_float16_maps_without_a_float32_copy(built, monkeypatch):
    # queries that float16 holds exactly (e.g. maps read back from an index) are scored against the
    # stored float16 chunks as they are; the CPU kernel widens exactly, so the scores are the float32 ones
    index, head, g, gen = built
    q = torch.cat([unit(2, gen), g[5:6]]).half().float()
    ref_v, ref_i = index.search(q, k=7, chunk=13, compute_dtype=torch.float32)
    seen = score_dtypes(monkeypatch)
    v, i = index.search(q, k=7, chunk=13)
    assert seen and set(seen) == {(torch.float16, torch.float16)}
    assert torch.equal(v, ref_v) and torch.equal(i, ref_i)
    seen.clear()
    v, i = index.search(q, k=7, shortlist=20)  # the two-stage path's exact re-scoring too
    assert seen and set(seen) == {(torch.float16, torch.float16)}
    ref = index.search(q, k=7, shortlist=20, compute_dtype=torch.float32)
    assert torch.equal(v, ref[0]) and torch.equal(i, ref[1])
    seen.clear()
    index.search(unit(1, gen), k=3)  # float32 queries float16 cannot hold: scored in float32 as before
    assert set(seen) == {(torch.float32, torch.float32)}


def test_bfloat16_chunks_are_scored_by_the_bfloat16_kernel(monkeypatch):
    # a bfloat16 gallery chunk and queries bfloat16 holds exactly are scored as they are, by the CPU
    # kernel's bfloat16 path (channel pairs): the dense bfloat16 scores, whatever the chunking, which are
    # the float32 kernel's on the maps in pair order and differ from the float32 ones in the last bits
    gen = torch.Generator().manual_seed(23)
    g = unit(45, gen, (17, FH, FW)).bfloat16()
    q = unit(3, gen, (17, FH, FW)).bfloat16().float()
    w, b = torch.randn(2 * FH * FW, generator=gen), torch.tensor(0.25)
    seen = score_dtypes(monkeypatch)
    v, i = streaming_topk(q, torch.split(g, 7), w, b, k=45)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    dense = qaconv_score(q.bfloat16(), g, w, b)
    ref = torch.sort(dense, dim=1, descending=True, stable=True)
    assert torch.equal(v, ref.values) and torch.equal(i, ref.indices)
    assert torch.equal(dense, qaconv_score(pair_order(q), pair_order(g), w, b))
    assert not torch.equal(dense, qaconv_score(q, g.float(), w, b))


def test_two_stage_search(built):
    index, head, g, gen = built
    q = g[[5, 20, 41]] + 0.05 * unit(3, gen)
    q = torch.nn.functional.normalize(q, dim=1)
    full_v, full_i = index.search(q, k=5)
    # a shortlist as large as the gallery is the exhaustive search
    v, i = index.search(q, k=5, shortlist=len(index))
    assert torch.equal(v, full_v) and torch.equal(i, full_i)
    # otherwise: exact scores of the shortlisted maps, in the same order rules
    M = 12
    v, i = index.search(q, k=5, shortlist=M)
    desc = global_descriptors(torch.from_numpy(np.array(index.maps())))
    _, cand = descriptor_topk(global_descriptors(q), [desc], M)
    w, b = head.folded()
    dense = qaconv_score(q, torch.from_numpy(np.array(index.maps())).float(), w.detach(), b.detach())
    ref_v, ref_i = select_topk(torch.gather(dense, 1, cand), cand, 5)
    assert torch.equal(v, ref_v) and torch.equal(i, ref_i)
    assert i[0, 0].item() == 5  # the near-duplicate of map 5 is found
    with pytest.raises(GalleryIndexError, match="shortlist=3 must be at least k=5"):
        index.search(q, k=5, shortlist=3)


def test_rerank_shortlist_fetches_sorted_candidates():
    gen = torch.Generator().manual_seed(5)
    g, q = unit(30, gen), unit(2, gen)
    head = make_head()
    w, b = head.folded()
    asked = []

    def fetch(idx):
        asked.append(idx.tolist())
        return g[torch.from_numpy(idx)]

    cand = torch.tensor([[20, 3, 11, 7], [0, 29, 5, 6]])
    v, i = rerank_shortlist(q, cand, fetch, w.detach(), b.detach(), 3)
    assert asked == [[3, 7, 11, 20], [0, 5, 6, 29]]
    dense = qaconv_score(q, g, w.detach(), b.detach())
    ref_v, ref_i = select_topk(torch.gather(dense, 1, cand), cand, 3)
    assert torch.equal(v, ref_v) and torch.equal(i, ref_i)


def test_failure_before_the_manifest_is_replaced_leaves_the_index(built, monkeypatch):
    """An append that fails after its maps are written (before the manifest's rename) commits nothing."""
    index, head, g, gen = built
    q = unit(2, gen)
    before = index.search(q, k=8)
    size_before = os.path.getsize(os.path.join(index.path, "maps.f16"))

    def fail(folder, manifest):
        assert os.path.getsize(os.path.join(folder, "maps.f16")) > size_before  # the maps are on disk
        raise OSError("disk full (injected)")

    monkeypatch.setattr(index_module, "write_manifest", fail)
    with pytest.raises(OSError, match="injected"):
        index.append(g[60:], records(30, 60))
    monkeypatch.undo()
    again = GalleryIndex.open(index.path, verify=True)
    assert len(again) == 60 and len(again.records) == 60
    after = again.search(q, k=8)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    # the leftover bytes are dropped by the next append, which then commits normally
    again.append(g[60:], records(30, 60))
    assert os.path.getsize(os.path.join(index.path, "maps.f16")) == 90 * D * FH * FW * 2
    _, ref_v, ref_i = dense_topk(q, g.half().float(), head, 8)
    v, i = GalleryIndex.open(index.path, verify=True).search(q, k=8)
    assert torch.equal(v, ref_v) and torch.equal(i, ref_i)


def test_crash_in_the_middle_of_the_maps_leaves_the_index(built, monkeypatch):
    """A process killed while writing (no clean-up at all): half a block of maps behind the committed end."""
    index, head, g, gen = built
    q = unit(2, gen)
    before = index.search(q, k=5)
    calls = {"n": 0}
    real_write = storage.SegmentWriter.write

    def write(self, maps, desc, lines):
        calls["n"] += 1
        if calls["n"] == 2:
            self._files[storage.MAPS_FILE].write(maps[: len(maps) // 2].tobytes())
            raise KeyboardInterrupt
        return real_write(self, maps, desc, lines)

    monkeypatch.setattr(storage.SegmentWriter, "write", write)
    monkeypatch.setattr(storage.SegmentWriter, "abort", lambda self: self._close())  # a crash cleans nothing
    blocks = [(g[60:70], records(10, 60)), (g[70:90], records(20, 70))]
    with pytest.raises(KeyboardInterrupt):
        index._append_blocks(blocks)
    monkeypatch.undo()
    assert os.path.getsize(os.path.join(index.path, "maps.f16")) > 60 * D * FH * FW * 2
    again = GalleryIndex.open(index.path, verify=True)
    assert len(again) == 60
    after = again.search(q, k=5)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def test_interrupted_create_leaves_nothing_or_the_old_index(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(6)
    head = make_head()
    g = unit(20, gen)
    monkeypatch.setattr(index_module, "write_manifest", lambda folder, manifest: (_ for _ in ()).throw(
        OSError("power cut (injected)")))
    with pytest.raises(OSError, match="injected"):
        GalleryIndex.create(tmp_path / "new.idx", head, g)
    assert os.listdir(tmp_path) == []  # neither the index nor its temporary folder
    monkeypatch.undo()
    old = GalleryIndex.create(tmp_path / "old.idx", head, g[:10])
    monkeypatch.setattr(index_module, "write_manifest", lambda folder, manifest: (_ for _ in ()).throw(
        OSError("power cut (injected)")))
    with pytest.raises(OSError, match="injected"):
        GalleryIndex.create(old.path, head, g, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["old.idx"] and len(GalleryIndex.open(old.path, verify=True)) == 10
    with pytest.raises(GalleryIndexError, match="already exists"):
        GalleryIndex.create(old.path, head, g)
    assert len(GalleryIndex.create(old.path, head, g, overwrite=True)) == 20


def test_damaged_indexes_are_refused_with_one_line(built, tmp_path):
    index, head, g, _ = built
    path = index.path
    with pytest.raises(GalleryIndexError, match="gallery index not found"):
        GalleryIndex.open(tmp_path / "missing.idx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GalleryIndexError, match=r"is not a gallery index \(no manifest.json\)"):
        GalleryIndex.open(tmp_path / "empty")
    maps = os.path.join(path, "maps.f16")
    original = open(maps, "rb").read()
    full = len(original)
    os.truncate(maps, full - 3)
    with pytest.raises(GalleryIndexError, match=r"maps.f16 is truncated: .* the manifest's 60 maps need"):
        GalleryIndex.open(path)
    os.truncate(maps, full)  # back to size, but the last map's bytes are now zeros
    with pytest.raises(GalleryIndexError, match="maps.f16 is damaged"):
        GalleryIndex.open(path, verify=True)
    open(maps, "wb").write(original)
    assert len(GalleryIndex.open(path, verify=True)) == 60
    rec = os.path.join(path, "records.jsonl")
    text = open(rec).read()
    open(rec, "w").write(text.replace("00003.jpg", "00004.jpg"))
    damaged = GalleryIndex.open(path)  # records are read on first use, and checked then
    with pytest.raises(GalleryIndexError, match="records.jsonl is damaged"):
        damaged.records
    with pytest.raises(GalleryIndexError, match="records.jsonl is damaged"):
        GalleryIndex.open(path, verify=True)
    man = os.path.join(path, "manifest.json")
    open(man, "w").write('{"format": "qaconv-ext-index/1", "count": ')
    with pytest.raises(GalleryIndexError, match="manifest.json is damaged"):
        GalleryIndex.open(path)


def test_other_model_and_bad_arguments(built, tmp_path):
    index, head, g, gen = built
    other = make_head(seed=9)
    with pytest.raises(GalleryIndexError, match="was made with another model: a QAConv head given with its maps"):
        GalleryIndex.open(index.path, head=other)
    assert len(GalleryIndex.open(index.path, head=head)) == 60
    with pytest.raises(GalleryIndexError, match=r"k=61 is larger than the gallery: .* holds 60 maps"):
        index.search(unit(1, gen), k=61)
    with pytest.raises(GalleryIndexError, match=r"the maps to add are \[4, 8, 2, 4\], the index holds \[n, 8, 4, 2\]"):
        index.append(torch.randn(4, D, 2, 4))
    with pytest.raises(GalleryIndexError, match="3 records for 4 maps"):
        index.append(unit(4, gen), records(3))
    with pytest.raises(GalleryIndexError, match="NaN or infinite"):
        index.append(torch.full((2, D, FH, FW), 1e6))
    with pytest.raises(GalleryIndexError, match=r"query maps are \[2, 8, 2, 4\]"):
        index.search(torch.randn(2, D, 2, 4))
    assert len(GalleryIndex.open(index.path, verify=True)) == 60  # nothing of the above was added


# ----------------------------------------------------------------------------------------------
# from images, and the command line
# ----------------------------------------------------------------------------------------------

def _save_checkpoint(path, seed: int) -> str:
    return save_tiny_checkpoint(path, seed, neck=D, height=IMG_H, width=IMG_W)


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """A tiny Market-1501 tree (5 identities, 2 cameras) and two tiny QAConv checkpoints."""
    root = tmp_path_factory.mktemp("market")
    data = root / "Market-1501-v15.09.15"
    put_market_views(data, range(1, 6), [("query", 1), ("bounding_box_test", 2), ("bounding_box_test", 2),
                                          ("bounding_box_train", 1)], seed=7, noise=25, size=(IMG_H, IMG_W))
    return {"root": str(root), "data": str(data), "ck": _save_checkpoint(root / "a.pt", 0),
            "other": _save_checkpoint(root / "b.pt", 1)}


def _run(argv):
    return cli.main([str(a) for a in argv])


def test_build_from_images_equals_create_from_extracted_maps(market, tmp_path):
    from qaconv_ext.data import Market1501
    from qaconv_ext.engine import load_trained
    from qaconv_ext.evaluation import extract_features

    ds = Market1501(market["data"])
    index = GalleryIndex.build(tmp_path / "b.idx", market["ck"], ds.gallery, batch_size=3, block=4, progress=False)
    backbone, head, cfg = load_trained(market["ck"])
    maps = extract_features(backbone, ds.gallery, IMG_H, IMG_W, batch_size=5, progress=False,
                            preprocess=cfg["preprocess"])
    assert np.array_equal(np.array(index.maps()), maps.half().numpy())
    assert index.records == list(ds.gallery)
    assert index.model["checkpoint"]["path"] == os.path.abspath(market["ck"])
    GalleryIndex.open(index.path, checkpoint=market["ck"], head=head)
    with pytest.raises(GalleryIndexError, match=r"was made with checkpoint .*a\.pt \(sha256 [0-9a-f]{12}\), not with "
                                                r".*b\.pt"):
        GalleryIndex.open(index.path, checkpoint=market["other"])
    index.append_images(ds.query, progress=False)
    assert len(index) == len(ds.gallery) + len(ds.query)
    with pytest.raises(GalleryIndexError, match="not with .*b.pt"):
        index.append_images(ds.query, checkpoint=market["other"], progress=False)
    assert len(GalleryIndex.open(index.path)) == len(ds.gallery) + len(ds.query)


def test_index_and_search_commands(market, tmp_path, capsys):
    idx = tmp_path / "archive.idx"
    gallery = os.path.join(market["data"], "bounding_box_test")
    assert _run(["index", "build", "--checkpoint", market["ck"], "--images", gallery, "-o", idx, "--device", "cpu",
                 "--no-progress"]) == 0
    assert "indexed 10 images" in capsys.readouterr().out
    assert _run(["index", "append", idx, "--dataset", "market1501", "--data-root", market["root"],
                 "--split", "train", "--device", "cpu", "--no-progress"]) == 0
    assert "now holds 15 maps" in capsys.readouterr().out
    assert _run(["index", "info", idx, "--verify"]) == 0
    assert "checksums: all match" in capsys.readouterr().out

    query = os.path.join(market["data"], "query", "0003_c1s1_000300_00.jpg")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    assert _run(["search", "--index", idx, query, "-k", 4, "--json", out_json, "-o", out_png, "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "query " + query in text and "c2" in text and "exhaustive" in text
    res = json.loads(out_json.read_text())
    hits = res["queries"][0]["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4] and all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    index = GalleryIndex.open(idx)
    backbone, _, cfg = index.load_model()
    from qaconv_ext.evaluation import extract_features
    q = extract_features(backbone, [query], IMG_H, IMG_W, progress=False, preprocess=cfg["preprocess"])
    v, i = index.search(q, k=4)
    assert [h["index"] for h in hits] == i[0].tolist() and [h["path"] for h in hits] == \
        [index.records[j].path for j in i[0].tolist()]
    assert Image.open(out_png).size[0] > 100
    assert _run(["search", "--index", idx, query, "-k", 3, "--shortlist", 5]) == 0
    assert "two-stage, shortlist 5" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("unreadable", "qaconv search: cannot read image .*broken.jpg"),
    ("missing", "qaconv search: gallery index not found: .*nowhere.idx"),
    ("k", r"qaconv search: -k 99 is larger than the gallery: .* holds 10 maps"),
    ("other", r"qaconv search: .* was made with checkpoint .*a\.pt .*not with .*b\.pt"),
    ("truncated", "qaconv search: .*maps.f16 is truncated"),
])
def test_search_command_errors_are_one_line(market, tmp_path, case, message):
    idx = tmp_path / "archive.idx"
    GalleryIndex.build(idx, market["ck"], [os.path.join(market["data"], "bounding_box_test", f)
                                           for f in sorted(os.listdir(os.path.join(market["data"],
                                                                                   "bounding_box_test")))],
                       progress=False)
    query = os.path.join(market["data"], "query", "0001_c1s1_000100_00.jpg")
    argv = ["search", "--index", idx, query]
    if case == "unreadable":
        bad = tmp_path / "broken.jpg"
        bad.write_bytes(b"not a jpeg")
        argv = ["search", "--index", idx, bad]
    elif case == "missing":
        argv[2] = tmp_path / "nowhere.idx"
    elif case == "k":
        argv += ["-k", 99]
    elif case == "other":
        argv += ["--checkpoint", market["other"]]
    elif case == "truncated":
        maps = idx / "maps.f16"
        os.truncate(maps, os.path.getsize(maps) // 2)
    with pytest.raises(SystemExit) as exc:
        _run(argv)
    text = str(exc.value)
    assert "\n" not in text
    import re
    assert re.match(message, text), text
