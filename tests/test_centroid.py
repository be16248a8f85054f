"""Centroid-coded maps: the ``centroid_score`` kernel against its float64 reference, spherical k-means,
the codebook and codes on disk (append, drift, damage), the centroid two-stage search and its commands."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from qaconv_ext.ops import QuantizedTable, centroid_score, centroid_table, quantize_centroid_table, reference
from qaconv_ext.search import GalleryIndex, GalleryIndexError, centroid_topk, rerank_shortlist, spherical_kmeans
from qaconv_ext.search import codes as codes_module
from qaconv_ext.search.centroids import encode_maps, location_vectors
from test_search import D, FH, FW, _run, dense_topk, make_head, market, records, unit  # noqa: F401 (fixture)

L = FH * FW


def random_problem(P: int, K: int, Lq: int, N: int, Lg: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(P, K, Lq, generator=gen)
    codes = torch.randint(0, K, (N, Lg), generator=gen).to(torch.uint16)
    weight = torch.rand(Lq + Lg, generator=gen) + 0.5
    bias = torch.randn((), generator=gen)
    return table, codes, weight, bias


# ----------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("P, K, Lq, N, Lg", [(1, 1, 1, 1, 1), (3, 37, 70, 1029, 13), (2, 300, 128, 517, 128),
                                             (4, 5, 5, 33, 7), (1, 65536, 9, 70, 3), (2, 17, 131, 600, 64)])
def test_kernel_matches_the_float64_reference(P, K, Lq, N, Lg):
    table, codes, weight, bias = random_problem(P, K, Lq, N, Lg, seed=P * 1000 + Lq)
    got = centroid_score(table, codes, weight, bias)
    want = reference.centroid_score(table.double(), codes, weight.double(), bias.double())
    assert got.dtype == torch.float32 and got.shape == (P, N)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_kernel_is_the_exact_score_when_every_location_is_a_centroid():
    gen = torch.Generator().manual_seed(3)
    q, g = unit(3, gen), unit(11, gen)
    head = make_head(1)
    w, b = (t.detach() for t in head.folded())
    centroids = location_vectors(g)  # every gallery location its own centroid
    codes = torch.arange(11 * L, dtype=torch.int64).reshape(11, L).to(torch.uint16)
    got = centroid_score(centroid_table(centroids, q), codes, w, b)
    want = reference.qaconv_score(q.double(), g.double(), w.double(), b.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_kernel_rejects_bad_inputs_and_has_a_fake_kernel():
    table, codes, weight, bias = random_problem(2, 10, 6, 8, 4, seed=1)
    bad = codes.clone()
    bad[3, 2] = 10
    with pytest.raises(ValueError, match="ids >= K = 10"):
        centroid_score(table, bad, weight, bias)
    with pytest.raises(TypeError, match="codes must be uint16"):
        centroid_score(table, codes.float(), weight, bias)
    with pytest.raises(ValueError, match="Lq \\+ Lg = 10"):
        centroid_score(table, codes, weight[:-1], bias)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        out = torch.ops.qaconv_ext.centroid_score(mode.from_tensor(table), mode.from_tensor(codes),
                                                  mode.from_tensor(weight), None)
    assert out.shape == (2, 8) and out.dtype == torch.float32


@pytest.mark.parametrize("P, K, Lq, N, Lg", [(1, 1, 1, 1, 1), (3, 37, 70, 1029, 13), (2, 300, 128, 517, 128),
                                             (2, 17, 192, 600, 64), (1, 40, 257, 300, 9), (2, 9, 63, 77, 17),
                                             (1, 65536, 9, 70, 3)])
def test_uint8_kernel_matches_the_float64_reference(P, K, Lq, N, Lg):
    # Lq 63/70/192/257: the 256-, 128- and 64-location register blocks and the byte tail; Lg 9/13/17: the
    # column term's 8-wide steps and its tail
    table, codes, weight, bias = random_problem(P, K, Lq, N, Lg, seed=7 * P + Lq)
    qt = quantize_centroid_table(table)
    got = centroid_score(qt, codes, weight, bias)
    want = reference.centroid_score_u8(*qt, codes, weight.double(), bias.double())
    assert got.dtype == torch.float32 and got.shape == (P, N)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    # within half a level of the float table per row term: |sum_i w_i (max decoded - max float)| <= sum |w| step/2
    exact = reference.centroid_score(table.double(), codes, weight.double(), bias.double())
    bound = weight[:Lq].abs().sum().double() * qt.scale[:, 1].double()[:, None] / 2
    assert bool(((got.double() - exact).abs() <= bound * (1 + 1e-5) + 1e-4).all())


def test_quantised_table_is_within_half_a_level_and_keeps_the_float_maxima():
    table, _, _, _ = random_problem(3, 50, 40, 1, 1, seed=11)
    table[1] = 0.25  # a constant table: one level, decoded exactly
    qt = quantize_centroid_table(table)
    assert isinstance(qt, QuantizedTable) and qt.values.dtype == torch.uint8
    decoded = qt.scale[:, 0, None, None] + qt.scale[:, 1, None, None] * qt.values.float()
    half = qt.scale[:, 1, None, None] / 2
    assert bool(((decoded - table).abs() <= half * (1 + 1e-5)).all())
    assert int(qt.values[0].min()) == 0 and int(qt.values[0].max()) == 255
    assert torch.equal(decoded[1], table[1])
    assert torch.equal(qt.colmax, table.amax(dim=2))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_centroid_table(torch.tensor([[[0.0, float("nan")]]]))
    with pytest.raises(ValueError, match=r"must be \[P, K, Lq\]"):
        quantize_centroid_table(torch.zeros(3, 4))


def test_uint8_kernel_rejects_bad_inputs_and_has_a_fake_kernel():
    table, codes, weight, bias = random_problem(2, 10, 6, 8, 4, seed=1)
    qt = quantize_centroid_table(table)
    bad = codes.clone()
    bad[5, 1] = 11
    with pytest.raises(ValueError, match="ids >= K = 10"):
        centroid_score(qt, bad, weight, bias)
    with pytest.raises(TypeError, match="codes must be uint16"):
        centroid_score(qt, codes.to(torch.float64), weight, bias)
    with pytest.raises(TypeError, match="table must be uint8"):
        centroid_score(QuantizedTable(qt.values.to(torch.int16), qt.scale, qt.colmax), codes, weight, bias)
    with pytest.raises(ValueError, match=r"colmax must be \[P, K\]"):
        centroid_score(QuantizedTable(qt.values, qt.scale, qt.colmax[:, :-1]), codes, weight, bias)
    with pytest.raises(ValueError, match=r"scale must be \[P, 2\]"):
        centroid_score(QuantizedTable(qt.values, qt.scale[:1], qt.colmax), codes, weight, bias)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        out = torch.ops.qaconv_ext.centroid_score_u8(*(mode.from_tensor(x) for x in qt), mode.from_tensor(codes),
                                                     mode.from_tensor(weight), None)
    assert out.shape == (2, 8) and out.dtype == torch.float32


def test_default_codebook_size_grows_with_the_gallery_up_to_4096():
    from qaconv_ext.search.centroids import default_codebook_size

    assert default_codebook_size(100) == 64  # at most the vectors (a power of two)
    assert default_codebook_size(2000) == 256  # at least 2^8
    assert default_codebook_size(1151 * 128) == 2048  # 4 sqrt(n) = 1,535
    assert default_codebook_size(5239 * 128) == 4096
    assert default_codebook_size(10 ** 6 * 128) == 4096  # the uint8 table stays in L2


# ----------------------------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------------------------

def test_spherical_kmeans_is_deterministic_and_lowers_the_error():
    gen = torch.Generator().manual_seed(5)
    centres = torch.nn.functional.normalize(torch.randn(12, 16, generator=gen), dim=1)
    x = centres.repeat(40, 1) + 0.05 * torch.randn(480, 16, generator=gen)
    errors = []
    a, err_a = spherical_kmeans(x, 12, iterations=8, seed=2, progress=lambda it, e: errors.append(e))
    b, err_b = spherical_kmeans(x, 12, iterations=8, seed=2)
    c, _ = spherical_kmeans(x, 12, iterations=8, seed=3)
    assert torch.equal(a, b) and err_a == err_b and not torch.equal(a, c)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(12))
    # Lloyd iterations never raise the error (each entry is the error of the centroids before that update)
    assert len(errors) == 8 and all(e1 <= e0 + 1e-6 for e0, e1 in zip(errors, errors[1:] + [err_a]))
    assert err_a < errors[0]
    # the error is the mean 1 - cosine of each (normalised) vector with its nearest centroid
    xn = torch.nn.functional.normalize(x, dim=1)
    assert err_a == pytest.approx(float((1 - (xn @ a.t()).max(dim=1).values.double()).mean()), abs=1e-6)
    with pytest.raises(ValueError, match="k=481"):
        spherical_kmeans(x, 481)


# ----------------------------------------------------------------------------------------------
# the index
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def coded(tmp_path):
    gen = torch.Generator().manual_seed(8)
    g = unit(70, gen)
    head = make_head()
    index = GalleryIndex.create(tmp_path / "c.idx", head, g[:50], records(50), codebook=16)
    return index, head, g, gen


_SEARCH_IN_A_FRESH_PROCESS = r"""
import sys, torch
from qaconv_ext.search import GalleryIndex
index = GalleryIndex.open(sys.argv[1])
index.search(torch.from_numpy(index.read_maps([0]).astype("float32")), k=3, shortlist=5, method="centroid")
print("sympy" in sys.modules)
"""


def test_a_centroid_search_does_not_import_sympy(coded):
    # torch's _check_* helpers import sympy (0.4 s) on first use: a one-query `qaconv search` took 0.6 s
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _SEARCH_IN_A_FRESH_PROCESS, coded[0].path], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_codes_on_disk_round_trip_with_append(coded):
    index, head, g, gen = coded
    cb = index.manifest["codebook"]
    assert cb["k"] == 16 and cb["dim"] == D and cb["trained_on"] == 50
    centroids = index.centroids()
    stored = np.concatenate(list(index.iter_codes(chunk=7)))
    assert stored.dtype == np.uint16 and stored.shape == (50, L)
    assert np.array_equal(stored, encode_maps(np.array(index.maps()), centroids)[0])
    assert os.path.getsize(os.path.join(index.path, cb["codes_file"])) == 50 * L * 2
    index.append(g[50:], records(20, 50))
    again = GalleryIndex.open(index.path, verify=True)
    assert len(again.manifest["codebook"]["segments"]) == 2 and torch.equal(again.centroids(), centroids)
    stored = np.concatenate(list(again.iter_codes()))
    assert np.array_equal(stored, encode_maps(np.array(again.maps()), centroids)[0])
    drift = again.codebook_drift()
    assert drift["appended_maps"] == 20 and drift["appended_error"] > 0 and drift["ratio"] == pytest.approx(
        drift["appended_error"] / drift["train_error"])
    # a retrain replaces the codebook and removes the old files
    old = set(os.listdir(index.path))
    again.train_codebook(8, seed=1)
    assert again.manifest["codebook"]["k"] == 8 and again.codebook_drift()["appended_maps"] == 0
    assert cb["codes_file"] not in os.listdir(index.path) and cb["codebook_file"] in old
    GalleryIndex.open(index.path, verify=True)


def test_a_plain_index_keeps_working_and_can_get_a_codebook(tmp_path):
    gen = torch.Generator().manual_seed(9)
    g, q = unit(30, gen), unit(2, gen)
    index = GalleryIndex.create(tmp_path / "p.idx", make_head(), g, records(30))
    assert not index.has_codebook and index.codebook_drift() is None
    with pytest.raises(GalleryIndexError, match="has no centroid codebook"):
        index.search(q, k=3, shortlist=5, method="centroid")
    index.append(unit(4, gen), records(4, 30))
    index.train_codebook(12)
    assert index.has_codebook and len(np.concatenate(list(index.iter_codes()))) == 34
    index.search(q, k=3, shortlist=5, method="centroid")


def test_interrupted_append_leaves_maps_and_codes(coded, monkeypatch):
    index, head, g, gen = coded
    before = GalleryIndex.open(index.path).manifest
    calls = []

    def failing(self, maps):
        calls.append(1)
        raise OSError("disk full")

    monkeypatch.setattr(codes_module.CodesWriter, "write", failing)
    with pytest.raises(OSError, match="disk full"):
        index.append(g[50:], records(20, 50))
    monkeypatch.undo()
    assert calls and GalleryIndex.open(index.path, verify=True).manifest == before
    index.append(g[50:60], records(10, 50))
    GalleryIndex.open(index.path, verify=True)
    assert np.concatenate(list(index.iter_codes())).shape == (60, L)


def test_damaged_codes_are_refused(coded):
    index, _, _, gen = coded
    cb = index.manifest["codebook"]
    codes_path = os.path.join(index.path, cb["codes_file"])
    book_path = os.path.join(index.path, cb["codebook_file"])
    data = bytearray(open(codes_path, "rb").read())
    data[5] ^= 1
    open(codes_path, "wb").write(bytes(data))
    with pytest.raises(GalleryIndexError, match="codes of maps 0..49 do not match their checksum"):
        GalleryIndex.open(index.path, verify=True)
    os.truncate(codes_path, 10)
    with pytest.raises(GalleryIndexError, match="holds 10 bytes"):
        GalleryIndex.open(index.path)
    book = bytearray(open(book_path, "rb").read())
    book[0] ^= 1
    open(book_path, "wb").write(bytes(book))
    os.truncate(codes_path, 50 * L * 2)
    with pytest.raises(GalleryIndexError, match="codebook.*does not match its checksum"):
        GalleryIndex.open(index.path).search(unit(1, gen), k=2, shortlist=4, method="centroid")
    os.remove(book_path)
    with pytest.raises(GalleryIndexError, match="is missing"):
        GalleryIndex.open(index.path)


# ----------------------------------------------------------------------------------------------
# the search
# ----------------------------------------------------------------------------------------------

def test_centroid_shortlist_of_the_whole_gallery_gives_the_exact_topk(coded):
    index, head, g, gen = coded
    q = unit(4, gen)
    w, b = head.folded()
    _, want_v, want_i = dense_topk(q, g[:50].half().float(), head, 6)  # the maps as stored
    ex_v, ex_i = index.search(q, k=6)
    _, cand = centroid_topk(q, index.iter_codes(chunk=9), index.centroids(), w, b, 50)
    assert cand.shape == (4, 50)
    v, i = rerank_shortlist(q, cand, index.read_maps, w, b, 6)
    assert torch.equal(i, want_i)
    torch.testing.assert_close(v, want_v)
    assert torch.equal(i, ex_i) and torch.equal(v, ex_v)  # bit for bit the exhaustive search


def test_lossless_codebook_shortlists_exactly_the_topk(tmp_path):
    gen = torch.Generator().manual_seed(11)
    g, q = unit(20, gen), unit(3, gen)
    head = make_head(2)
    # K = every location vector: k-means starts from all of them and keeps them, so codes are lossless
    index = GalleryIndex.create(tmp_path / "l.idx", head, g, records(20), codebook=20 * L)
    _, want_v, want_i = dense_topk(q, g.half().float(), head, 5)
    v, i = index.search(q, k=5, shortlist=5, method="centroid")
    assert torch.equal(i, want_i)
    with pytest.raises(GalleryIndexError, match="unknown search method 'fast'"):
        index.search(q, k=5, shortlist=5, method="fast")
    with pytest.raises(GalleryIndexError, match="give the shortlist size"):
        index.search(q, k=5, method="centroid")


def test_codebook_commands(market, tmp_path, capsys):  # noqa: F811 (fixture)
    idx = tmp_path / "archive.idx"
    gallery = os.path.join(market["data"], "bounding_box_test")
    assert _run(["index", "build", "--checkpoint", market["ck"], "--images", gallery, "-o", idx, "--device", "cpu",
                 "--no-progress", "--codebook", 32]) == 0
    out = capsys.readouterr().out
    assert "indexed 10 images" in out
    assert _run(["index", "append", idx, "--dataset", "market1501", "--data-root", market["root"],
                 "--split", "train", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "now holds 15 maps" in out and "codebook: 32 centroids" in out and "5 maps appended since" in out
    assert _run(["index", "info", idx, "--verify"]) == 0
    assert "codebook: 32 centroids" in capsys.readouterr().out
    query = os.path.join(market["data"], "query", "0003_c1s1_000300_00.jpg")
    out_json = tmp_path / "r.json"
    assert _run(["search", "--index", idx, query, "-k", 3, "--shortlist", 15, "--method", "centroid",
                 "--json", out_json]) == 0
    assert "two-stage by centroid codes, shortlist 15" in capsys.readouterr().out
    hits = json.loads(out_json.read_text())["queries"][0]["results"]
    index = GalleryIndex.open(idx)
    from qaconv_ext.evaluation import extract_features
    backbone, _, cfg = index.load_model()
    q = extract_features(backbone, [query], int(cfg["height"]), int(cfg["width"]), progress=False,
                         preprocess=cfg["preprocess"])
    assert [h["index"] for h in hits] == index.search(q, k=3)[1][0].tolist()
    assert _run(["index", "codebook", idx, "--k", 16, "--seed", 1]) == 0
    assert "codebook: 16 centroids" in capsys.readouterr().out
