"""The input preset is plain data: a checkpoint's config records it, load_trained returns it, feature
extraction takes it, and a gallery index records the one its model used."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from qaconv_ext import cli
from qaconv_ext.data import build_test_transform
from qaconv_ext.engine import TrainConfig, build_model, load_trained
from qaconv_ext.evaluation import extract_features
from qaconv_ext.search import GalleryIndex, GalleryIndexError

H, W = 32, 16


def _checkpoint(path, cfg, backbone, criterion) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"format": "qaconv-ext/1", "epoch": 1, "model": backbone.state_dict(),
                "head": criterion.matcher.state_dict(), "criterion": criterion.state_dict(), "config": cfg}, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same weights saved as an ``imagenet``-preset run and as a ``public``-preset run, and images."""
    root = tmp_path_factory.mktemp("presets")
    torch.manual_seed(0)
    cfg = TrainConfig(arch="small", neck=16, height=H, width=W, preprocess="imagenet")
    backbone, criterion = build_model(cfg, 3)
    imagenet = _checkpoint(str(root / "imagenet" / "checkpoint.pt"), cfg.to_dict(), backbone, criterion)
    public = _checkpoint(str(root / "public" / "checkpoint.pt"), dict(cfg.to_dict(), preprocess="public"),
                         backbone, criterion)
    rng = np.random.default_rng(0)
    paths = []
    for k in range(5):
        p = str(root / f"{k + 1:04d}_c{k % 2 + 1}s1_{k:06d}_00.png")
        Image.fromarray(rng.integers(0, 256, (70, 30, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return dict(imagenet=imagenet, public=public, paths=paths, root=root)


def test_load_trained_returns_the_preset(models):
    trained = load_trained(models["imagenet"])
    assert trained.preprocess == "imagenet" and trained.config["preprocess"] == "imagenet"
    assert not hasattr(trained.backbone, "preprocess")   # the module carries no preset
    backbone, head, cfg = trained                        # unpacks as before
    assert load_trained(models["public"]).preprocess == "public"


def test_extraction_uses_the_preset_it_is_given(models):
    backbone = load_trained(models["imagenet"]).backbone
    img = Image.open(models["paths"][0]).convert("RGB")
    for preset in ("imagenet", "public"):
        with torch.no_grad():
            want = backbone(build_test_transform(H, W, preset)(img)[None])
        got = extract_features(backbone, models["paths"][:1], H, W, progress=False, preprocess=preset)
        assert torch.equal(got, want)
    a, b = (extract_features(backbone, models["paths"], H, W, progress=False, preprocess=p) for p in ("imagenet", "public"))
    assert not torch.allclose(a, b)


def test_an_imagenet_models_index_says_imagenet(models, tmp_path):
    index = GalleryIndex.build(tmp_path / "g.idx", models["imagenet"], models["paths"], progress=False)
    assert index.model["preprocessing"] == repr(build_test_transform(H, W, "imagenet"))
    assert index.model["preprocess"] == "imagenet"
    trained = load_trained(models["imagenet"])
    maps = extract_features(trained.backbone, models["paths"], H, W, progress=False, preprocess="imagenet")
    assert np.array_equal(np.array(index.maps()), maps.half().numpy())


def test_index_info_names_the_preset(models, tmp_path, capsys):
    index = GalleryIndex.build(tmp_path / "g.idx", models["imagenet"], models["paths"], progress=False)
    assert cli.main(["index", "info", index.path]) == 0
    assert f"input {H} x {W}, preset imagenet: " in capsys.readouterr().out


def test_a_model_of_the_other_preset_is_refused(models, tmp_path):
    backbone, head, cfg = load_trained(models["imagenet"])
    maps = extract_features(backbone, models["paths"], H, W, progress=False, preprocess=cfg["preprocess"])
    # maps with their model's config, no checkpoint recorded: only the model's head and preset identify it
    index = GalleryIndex.create(tmp_path / "m.idx", head, maps, models["paths"], config=cfg)
    GalleryIndex.open(index.path, checkpoint=models["imagenet"])            # the same model: accepted
    with pytest.raises(GalleryIndexError, match=r"made with the imagenet input preset.*uses the public preset"):
        GalleryIndex.open(index.path, checkpoint=models["public"])
    with pytest.raises(GalleryIndexError, match="uses the public preset"):
        index.append_images(models["paths"][:2], checkpoint=models["public"], progress=False)
    assert len(GalleryIndex.open(index.path)) == len(models["paths"])
