"""Dataset parsing on generated file trees with the real naming of each dataset."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch

from qaconv_ext.data import (
    DUKE_FRAME_OFFSETS,
    DatasetFormatError,
    DukeMTMCreID,
    ImageDataset,
    ImageFolderDataset,
    ImageReadError,
    Market1501,
    MSMT17,
    Record,
    build_dataset,
    build_test_transform,
    read_image,
)
from qaconv_ext.data.datasets import market_cumulative_frames, market_session_frames

Image = pytest.importorskip("PIL.Image")


def _jpeg_bytes(color=(200, 30, 30), size=(4, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg_bytes()


def _touch(folder, names, data: bytes = JPEG):
    os.makedirs(folder, exist_ok=True)
    for n in names:
        with open(os.path.join(folder, n), "wb") as fh:
            fh.write(data)


def _by_name(records):
    return {os.path.basename(r.path): r for r in records}


# ----------------------------------------------------------------------------------------------
# Market-1501
# ----------------------------------------------------------------------------------------------

def _market_tree(base):
    _touch(os.path.join(base, "bounding_box_train"), [
        "0030_c1s1_000100_01.jpg",
        "0007_c1s1_000500_02.jpg",   # largest kept frame of camera 1, session 1
        "0002_c2s1_000040_01.jpg",
        "0002_c2s2_000010_01.jpg",
        "0007_c3s1_000020_01.jpg",
    ])
    _touch(os.path.join(base, "bounding_box_train"), ["Thumbs.db"], b"not an image")
    _touch(os.path.join(base, "query"), [
        "0011_c1s2_000050_00.jpg",
        "0011_c2s3_000007_00.jpg",   # camera 2 session 3 (session 2 max is in the gallery)
    ])
    _touch(os.path.join(base, "bounding_box_test"), [
        "0011_c2s2_000090_01.jpg",   # largest frame of camera 2, session 2 (gallery)
        "0011_c1s1_000200_01.jpg",
        "0000_c1s2_000300_03.jpg",   # distractor: kept
        "-1_c1s1_009999_04.jpg",     # junk: dropped, and must not shift the sessions
    ])


def test_market_records_times_and_labels(tmp_path):
    base = tmp_path / "Market-1501-v15.09.15"
    _market_tree(str(base))
    ds = Market1501(str(base))

    train = _by_name(ds.train)
    assert len(ds.train) == 5                      # Thumbs.db skipped
    assert ds.num_train_pids == 3 and ds.num_train_cams == 3
    # train pids 2, 7, 30 relabelled in ascending order
    assert ds.train_pid_map == {2: 0, 7: 1, 30: 2}
    assert train["0030_c1s1_000100_01.jpg"].pid == 2
    assert train["0007_c3s1_000020_01.jpg"] == Record(
        str(base / "bounding_box_train" / "0007_c3s1_000020_01.jpg"), 1, 2, 20 / 25)

    q = _by_name(ds.query)
    # camera 1: session 2 is offset by the largest session-1 frame over all splits (500, junk ignored)
    assert q["0011_c1s2_000050_00.jpg"].time == pytest.approx((500 + 50) / 25)
    assert q["0011_c1s2_000050_00.jpg"].pid == 11 and q["0011_c1s2_000050_00.jpg"].camid == 0
    # camera 2, public offsets: O[2] = max(s1) = 40; O[3] = max(s2) + 2 O[2] = 90 + 80 (the 90 is a gallery image)
    assert q["0011_c2s3_000007_00.jpg"].time == pytest.approx((90 + 2 * 40 + 7) / 25)
    # cumulative offsets: O[3] = max(s1) + max(s2) = 40 + 90
    cumulative = _by_name(Market1501(str(base), session_offsets="cumulative").query)
    assert cumulative["0011_c2s3_000007_00.jpg"].time == pytest.approx((40 + 90 + 7) / 25)
    assert cumulative["0011_c1s2_000050_00.jpg"].time == q["0011_c1s2_000050_00.jpg"].time

    g = _by_name(ds.gallery)
    assert "-1_c1s1_009999_04.jpg" not in g
    assert g["0000_c1s2_000300_03.jpg"].pid == 0     # distractors stay
    assert g["0000_c1s2_000300_03.jpg"].time == pytest.approx(800 / 25)
    assert g["0011_c2s2_000090_01.jpg"].time == pytest.approx(130 / 25)
    assert ds.has_time
    s = ds.summary()
    assert "train" in s and "gallery" in s and "distractors" in s


def _shift_sessions_one_by_one(entries, reread_after_shift):
    """Put sessions on one clock the long way: per camera, shift session s by the end of session s - 1
    (its largest frame, read after that session was shifted or before) plus the offset of s - 1."""
    frames = np.array([f for _, _, f in entries], dtype=np.int64)
    raw = frames.copy()
    cams = np.array([c for c, _, _ in entries])
    sess = np.array([s for _, s, _ in entries])
    for c in np.unique(cams):
        offset = 0
        for s in range(2, int(sess[cams == c].max()) + 1):
            prev = (cams == c) & (sess == s - 1)
            end = (frames if reread_after_shift else raw)[prev].max() if prev.any() else 0
            offset = end + offset
            frames[(cams == c) & (sess == s)] += offset
    return frames.tolist()


def test_market_session_offsets_equal_a_session_by_session_shift():
    rng = np.random.default_rng(0)
    entries = []
    for cam in range(1, 7):
        sessions = [s for s in range(1, 7) if rng.random() < 0.75] or [1]   # some sessions are empty
        for s in sessions:
            entries += [(cam, s, int(f)) for f in rng.integers(0, 150_000, rng.integers(1, 30))]
    order = rng.permutation(len(entries))
    entries = [entries[i] for i in order]
    public = market_session_frames(entries)
    assert public == _shift_sessions_one_by_one(entries, reread_after_shift=True)
    cumulative = market_session_frames(entries, "cumulative")
    assert cumulative == _shift_sessions_one_by_one(entries, reread_after_shift=False)
    assert cumulative == market_cumulative_frames(entries)
    assert public != cumulative                     # with up to six sessions the rules differ
    # the closed form of the public rule: O[s] = M[s-1] + 2 O[s-1]
    four = [(1, 1, 100), (1, 2, 200), (1, 3, 300), (1, 4, 0)]
    assert market_session_frames(four) == [100, 300, 700, 1100]          # O = 0, 100, 400, 1100
    assert market_session_frames(four, "cumulative") == [100, 300, 600, 600]   # O = 0, 100, 300, 600
    with pytest.raises(ValueError, match="unknown session_offsets 'sum'; valid: public, cumulative"):
        market_session_frames(four, "sum")


def test_synthetic_network_times_agree_under_both_offset_rules(tmp_path):
    """Two sessions per camera (the built-in network's default): both rules give the same times, so the
    demo's TLift numbers do not depend on the choice; with three sessions they differ."""
    from qaconv_ext.data import make_synthetic_network

    tiny = dict(num_train_ids=8, num_test_ids=12, num_distractors=6, num_junk=4, images_per_visit=(1, 3),
                group_interval=60.0, seed=3, workers=0, progress=False)
    for sessions, same in ((2, True), (3, False)):
        paths = make_synthetic_network(str(tmp_path / f"s{sessions}"), sessions_per_camera=sessions, **tiny)
        for path in paths.values():
            a, b = Market1501(path), Market1501(path, session_offsets="cumulative")
            times_a = [r.time for r in a.train + a.query + a.gallery]
            times_b = [r.time for r in b.train + b.query + b.gallery]
            assert (times_a == times_b) is same


def test_market_root_resolution_and_errors(tmp_path):
    _market_tree(str(tmp_path / "Market-1501-v15.09.15"))
    assert len(Market1501(str(tmp_path)).train) == 5   # parent folder holding the canonical name
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Market1501(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        Market1501(str(empty))


def test_market_missing_subfolder_and_bad_name(tmp_path):
    base = tmp_path / "m"
    _market_tree(str(base))
    _touch(str(base / "query"), ["0011_c1_broken.jpg"])
    with pytest.raises(DatasetFormatError, match="0011_c1_broken.jpg"):
        Market1501(str(base))
    os.remove(base / "query" / "0011_c1_broken.jpg")
    os.rename(base / "query", base / "queries")
    with pytest.raises(FileNotFoundError, match=str(base)):
        Market1501(str(base))


# ----------------------------------------------------------------------------------------------
# DukeMTMC-reID
# ----------------------------------------------------------------------------------------------

def test_duke_times_and_cameras(tmp_path):
    base = tmp_path / "DukeMTMC-reID"
    _touch(str(base / "bounding_box_train"), ["0005_c1_f0001000.jpg", "0009_c8_f0000020.jpg"])
    _touch(str(base / "query"), ["0010_c5_f0046182.jpg"])
    _touch(str(base / "bounding_box_test"), ["0010_c2_f0050000.jpg", "0000_c3_f0000001.jpg",
                                             "-1_c3_f0000002.jpg"])
    ds = DukeMTMCreID(str(tmp_path))                   # parent folder
    tr = _by_name(ds.train)
    assert tr["0005_c1_f0001000.jpg"].time == pytest.approx((1000 + 5542) / 59.94)
    assert tr["0009_c8_f0000020.jpg"].time == pytest.approx((20 + 46765) / 59.94)
    assert tr["0009_c8_f0000020.jpg"].camid == 7 and tr["0009_c8_f0000020.jpg"].pid == 1
    assert _by_name(ds.query)["0010_c5_f0046182.jpg"].time == pytest.approx(46182 / 59.94)
    gal = _by_name(ds.gallery)
    assert set(gal) == {"0010_c2_f0050000.jpg", "0000_c3_f0000001.jpg"}
    assert gal["0010_c2_f0050000.jpg"].time == pytest.approx((50000 + DUKE_FRAME_OFFSETS[1]) / 59.94)
    assert ds.num_train_cams == 2

    _touch(str(base / "query"), ["0010_c9_f0000001.jpg"])
    with pytest.raises(DatasetFormatError, match="0010_c9_f0000001.jpg"):
        DukeMTMCreID(str(base))


# ----------------------------------------------------------------------------------------------
# MSMT17
# ----------------------------------------------------------------------------------------------

def _msmt_tree(base, train_dir="train", test_dir="test"):
    lists = {
        "list_train.txt": [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                           ("0000/0000_001_05_0303morning_0016_0.jpg", 0),
                           ("0003/0003_000_15_0303noon_0001_1.jpg", 3)],
        "list_val.txt": [("0003/0003_004_02_0303noon_0003_0.jpg", 3)],
        "list_query.txt": [("0000/0000_000_07_0113morning_0002_0.jpg", 0)],
        "list_gallery.txt": [("0000/0000_003_09_0113noon_0010_0.jpg", 0),
                             ("0005/0005_000_11_0113afternoon_0001_0.jpg", 5)],
    }
    for name, entries in lists.items():
        folder = train_dir if name in ("list_train.txt", "list_val.txt") else test_dir
        for rel, _ in entries:
            d, f = rel.split("/")
            _touch(os.path.join(base, folder, d), [f])
        with open(os.path.join(base, name), "w") as fh:
            fh.write("".join(f"{rel} {pid}\n" for rel, pid in entries))


def test_msmt17_lists_cameras_and_combine(tmp_path):
    base = tmp_path / "MSMT17_V1"
    _msmt_tree(str(base))
    ds = MSMT17(str(tmp_path))
    assert len(ds.train) == 4 and ds.num_train_pids == 2
    cams = sorted(r.camid for r in ds.train)
    assert cams == [0, 1, 4, 14]                       # third field, 1-based -> 0-based
    assert all(r.time is None for r in ds.train + ds.query + ds.gallery)
    assert not ds.has_time
    assert ds.query[0].camid == 6 and ds.query[0].pid == 0
    assert ds.query[0].path == str(base / "test" / "0000" / "0000_000_07_0113morning_0002_0.jpg")

    only_train = MSMT17(str(base), use_val=False)
    assert len(only_train.train) == 3

    allds = MSMT17(str(base), combine_all=True)
    assert len(allds.train) == 4 + 3
    assert allds.num_train_pids == 2 + 2               # test identities 0 and 5 added, offset
    assert len(allds.query) == 1 and len(allds.gallery) == 2


def test_msmt17_v2_folders_and_errors(tmp_path):
    base = tmp_path / "MSMT17_V2"
    _msmt_tree(str(base), "mask_train_v2", "mask_test_v2")
    assert len(MSMT17(str(tmp_path)).gallery) == 2
    with open(base / "list_val.txt", "a") as fh:
        fh.write("0003/0003_005_02_0303noon_0004_0.jpg\n")      # pid missing
    with pytest.raises(DatasetFormatError, match="list_val.txt:2"):
        MSMT17(str(base))
    with open(base / "list_val.txt", "w") as fh:
        fh.write("0003/0003_009_02_0303noon_0004_0.jpg 3\n")    # file not on disk
    with pytest.raises(FileNotFoundError, match="0003_009_02_0303noon_0004_0.jpg"):
        MSMT17(str(base))
    with open(base / "list_val.txt", "w") as fh:
        fh.write("0003/0003_badname.jpg 3\n")
    with pytest.raises(DatasetFormatError, match="0003_badname.jpg"):
        MSMT17(str(base))


# ----------------------------------------------------------------------------------------------
# Generic folders
# ----------------------------------------------------------------------------------------------

def test_image_folder_dataset_patterns(tmp_path):
    _touch(str(tmp_path / "train" / "17"), ["cam3_frame100.png", "cam4_frame20.png"])
    _touch(str(tmp_path / "train" / "42"), ["cam3_frame5.png"])
    _touch(str(tmp_path / "gallery" / "42"), ["cam4_frame50.png"])
    ds = ImageFolderDataset(str(tmp_path), train="train", query=None, gallery="gallery",
                            pattern=r"cam(?P<cam>\d+)_frame(?P<frame>\d+)", fps=10.0, cam_base=None)
    assert ds.num_train_pids == 2 and ds.query == []
    tr = _by_name(ds.train)
    assert tr["cam4_frame20.png"].camid == 1 and tr["cam4_frame20.png"].time == pytest.approx(2.0)
    assert tr["cam3_frame5.png"].pid == 1              # folder 42 -> label 1
    assert ds.gallery[0].pid == 42

    with pytest.raises(ValueError, match="fps"):
        ImageFolderDataset(str(tmp_path), train="train", query=None, gallery=None,
                           pattern=r"cam(?P<cam>\d+)_frame(?P<frame>\d+)")
    with pytest.raises(DatasetFormatError, match="cam3_frame100.png"):
        ImageFolderDataset(str(tmp_path), train="train", query=None, gallery=None)


def test_image_folder_reads_market_names_and_build_dataset(tmp_path):
    base = tmp_path / "Market-1501-v15.09.15"
    _market_tree(str(base))
    ds = ImageFolderDataset(str(base))
    assert len(ds.train) == 5 and len(ds.gallery) == 3 and not ds.has_time
    assert sorted(r.camid for r in ds.query) == [0, 1]
    m = build_dataset("Market-1501", str(tmp_path))
    assert isinstance(m, Market1501) and len(m.gallery) == 3
    with pytest.raises(KeyError):
        build_dataset("cuhk99", str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

def test_read_image_and_errors(tmp_path):
    gray = tmp_path / "gray.png"
    Image.new("L", (5, 9), 77).save(gray)
    img = read_image(str(gray))
    assert img.mode == "RGB" and img.size == (5, 9) and img.getpixel((0, 0)) == (77, 77, 77)
    with pytest.raises(ImageReadError, match="missing.jpg"):
        read_image(str(tmp_path / "missing.jpg"))
    bad = tmp_path / "0001_c1s1_000001_01.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(OSError, match="0001_c1s1_000001_01.jpg"):
        read_image(str(bad))
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(_jpeg_bytes(size=(64, 128))[:200])
    with pytest.raises(ImageReadError, match="trunc.jpg"):
        read_image(str(trunc))


def test_image_dataset_items(tmp_path):
    base = tmp_path / "m"
    _market_tree(str(base))
    ds = Market1501(str(base))
    data = ImageDataset(ds.query, build_test_transform(32, 16))
    img, pid, camid, index = data[1]
    assert img.shape == (3, 32, 16) and img.dtype == torch.float32
    assert (pid, camid, index) == (ds.query[1].pid, ds.query[1].camid, 1)
    assert len(data) == 2 and data.times == [r.time for r in ds.query]
    raw = ImageDataset(ds.query)[0][0]
    assert raw.mode == "RGB"
    broken = ImageDataset([Record(str(tmp_path / "nope.jpg"), 0, 0)])
    with pytest.raises(ImageReadError, match="nope.jpg"):
        broken[0]


# ----------------------------------------------------------------------------------------------
# Bad input: empty splits, test-only folders, unreadable images
# ----------------------------------------------------------------------------------------------

def test_empty_split_folder_is_named(tmp_path):
    base = tmp_path / "Market-1501"
    _market_tree(str(base))
    for f in os.listdir(base / "query"):
        os.remove(base / "query" / f)
    _touch(str(base / "query"), ["Thumbs.db"], b"not an image")
    with pytest.raises(DatasetFormatError, match=r"^Market-1501: no images in .*query \(") as err:
        Market1501(str(tmp_path))
    assert str(base / "query") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DatasetFormatError, match="no images in .*query"):
        ImageFolderDataset(str(base))
    # a folder that holds only junk images (pid -1) is as good as empty
    _touch(str(base / "query"), ["-1_c1s1_000001_00.jpg"])
    with pytest.raises(DatasetFormatError, match=r"no usable images in .*query \(1 junk"):
        Market1501(str(base))


def test_test_only_folders_are_readable_for_evaluation(tmp_path):
    """A copy without the training split reads with splits=("query", "gallery"); when the training split
    is asked for, the error names the missing folder."""
    base = tmp_path / "Market-1501-v15.09.15"
    _market_tree(str(base))
    import shutil
    shutil.rmtree(base / "bounding_box_train")
    with pytest.raises(FileNotFoundError, match=r"Market-1501: .*Market-1501-v15.09.15 has no bounding_box_train"
                                                r".*splits=\('query', 'gallery'\)") as err:
        Market1501(str(tmp_path))
    assert "\n" not in str(err.value)
    ds = Market1501(str(tmp_path), splits=("query", "gallery"))
    assert ds.train == [] and len(ds.query) == 2 and len(ds.gallery) == 3
    assert ds.query[0].time is not None and ds.num_train_pids == 0
    assert len(build_dataset("market1501", str(base), splits=("query", "gallery")).gallery) == 3
    with pytest.raises(ValueError, match="splits"):
        Market1501(str(base), splits=("query", "test"))

    duke = tmp_path / "DukeMTMC-reID"
    _touch(str(duke / "query"), ["0010_c5_f0046182.jpg"])
    _touch(str(duke / "bounding_box_test"), ["0010_c2_f0050000.jpg"])
    with pytest.raises(FileNotFoundError, match="has no bounding_box_train"):
        DukeMTMCreID(str(tmp_path))
    assert len(DukeMTMCreID(str(tmp_path), splits=("query", "gallery")).gallery) == 1

    msmt = tmp_path / "MSMT17_V1"
    _msmt_tree(str(msmt))
    shutil.rmtree(msmt / "train")
    os.remove(msmt / "list_train.txt")
    os.remove(msmt / "list_val.txt")
    with pytest.raises(FileNotFoundError, match=r"MSMT17: .*MSMT17_V1 has no list_train.txt"):
        MSMT17(str(tmp_path))
    ms = MSMT17(str(tmp_path), splits=("query", "gallery"))
    assert ms.train == [] and len(ms.query) == 1 and len(ms.gallery) == 2

    folder = ImageFolderDataset(str(base), splits=("query", "gallery"))
    assert folder.train == [] and len(folder.gallery) == 3
    with pytest.raises(FileNotFoundError, match=r"bounding_box_train.*training split"):
        ImageFolderDataset(str(base))


def _corrupt_tree(base):
    _market_tree(str(base))
    (base / "bounding_box_train" / "0002_c2s1_000040_01.jpg").write_bytes(JPEG[:len(JPEG) // 2])  # truncated
    (base / "bounding_box_test" / "0011_c1s1_000200_01.jpg").write_bytes(b"\xff\xd8\xff garbage")


def test_corrupt_image_through_a_worker_is_one_line_naming_the_path(tmp_path):
    base = tmp_path / "m"
    _corrupt_tree(base)
    ds = Market1501(str(base))  # reading the folder does not open the images
    loader = torch.utils.data.DataLoader(ImageDataset(ds.gallery, build_test_transform(32, 16)), batch_size=2,
                                         num_workers=1)
    with pytest.raises(ImageReadError) as err:
        list(loader)
    msg = str(err.value)
    assert msg.startswith("cannot read image ") and "0011_c1s1_000200_01.jpg" in msg and "\n" not in msg
    assert "Traceback" in err.value.worker_traceback


def test_skip_bad_images_skips_and_counts(tmp_path):
    base = tmp_path / "m"
    _corrupt_tree(base)
    ds = Market1501(str(base), skip_bad_images=True)
    assert len(ds.train) == 4 and len(ds.gallery) == 2 and len(ds.query) == 2
    skipped = {os.path.basename(p): why for p, why in ds.skipped_images}
    assert set(skipped) == {"0002_c2s1_000040_01.jpg", "0011_c1s1_000200_01.jpg"}
    assert "truncated" in skipped["0002_c2s1_000040_01.jpg"].lower()
    assert ds.num_train_pids == 3 and "unreadable images skipped: 2" in ds.summary()
    # times come from the names, so the skipped images do not move anyone's time stamp
    full = Market1501(str(base))
    assert {r.path: r.time for r in ds.query} == {r.path: r.time for r in full.query}
    # the same on a plain list of records
    data = ImageDataset(full.gallery, build_test_transform(32, 16), skip_bad_images=True)
    assert len(data) == 2 and [os.path.basename(p) for p, _ in data.skipped] == ["0011_c1s1_000200_01.jpg"]
    assert all(x[0].shape == (3, 32, 16) for x in data)
    # every image unreadable in a split: named like an empty folder
    for f in os.listdir(base / "query"):
        (base / "query" / f).write_bytes(b"junk bytes")
    with pytest.raises(DatasetFormatError, match=r"no usable images in .*query \(2 unreadable"):
        Market1501(str(base), skip_bad_images=True)
