"""Checkpoints laid out as the public QAConv code writes them (every release, every --ibn) load with the
backbone inferred from the weights; what does not fit is named in one line."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from qaconv_ext import QAConv
from qaconv_ext.data import build_test_transform
from qaconv_ext.engine import CheckpointError, find_checkpoint, infer_backbone, load_trained
from qaconv_ext.evaluation import extract_features
from qaconv_ext.models import build_backbone, resnet

Image = pytest.importorskip("PIL.Image")

# What each release's main.py saves (top-level keys) and how its model and criterion are laid out:
# the backbone is the whole torchvision / IBN-Net network (layer4 and fc included) plus the neck; the head
# sits at the top of the criterion (v1.0, v1.1: QAConvLoss) or under ``matcher.`` (v1.2+); v1.0-v2.0
# match with a 2L-weight FC, v2.1+ with a shared L-weight FC; v2.1+ trains with a triplet loss (no memory).
RELEASES = {
    "v1.0": dict(neck_type="bn", head="top", layout="eccv", memory=True, valid=False, extra=False),
    "v1.1": dict(neck_type="bn", head="top", layout="eccv", memory=True, valid=True, extra=False),
    "v1.2": dict(neck_type="bn", head="matcher", layout="eccv", memory=True, valid=True, extra=False),
    "v2.0": dict(neck_type="bn", head="matcher", layout="eccv", memory=True, valid=True, extra=False),
    "v2.1": dict(neck_type="bias", head="matcher", layout="v2", memory=False, valid=False, extra=True),
}
VERSION_LABEL = {"v1.0": "v1.0-v1.1", "v1.1": "v1.0-v1.1", "v1.2": "v1.2-v2.0", "v2.0": "v1.2-v2.0",
                 "v2.1": "v2.1+"}
H, W = 64, 32          # input size of the tests: 4 x 2 maps at stride 16


def _random_like(t: torch.Tensor, gen: torch.Generator, key: str) -> torch.Tensor:
    if not t.is_floating_point():
        return t.clone()
    if key.endswith("running_var"):
        return torch.rand(t.shape, generator=gen) + 0.5
    return torch.randn(t.shape, generator=gen) * 0.2 + (1.0 if key.endswith(("bn1.weight", "IN.weight")) else 0.0)


def public_checkpoint(folder, release: str, arch: str, ibn, gen: torch.Generator, num_classes: int = 5,
                      height: int = H, width: int = W):
    """Write ``folder/checkpoint.pth.tar`` with the keys and nesting of that release's main.py."""
    spec = RELEASES[release]
    trunk = resnet(arch, "layer4", ibn=ibn)
    model = {"base." + k: _random_like(v, gen, k) for k, v in trunk.state_dict().items()}
    model["base.fc.weight"] = torch.randn(1000, trunk.out_channels, generator=gen)
    model["base.fc.bias"] = torch.randn(1000, generator=gen)
    neck = build_backbone(arch, neck=16, ibn=ibn, neck_type=spec["neck_type"])
    model.update({k: _random_like(v, gen, k) for k, v in neck.state_dict().items() if not k.startswith("base.")})
    head = QAConv(16, height // 16, width // 16, layout=spec["layout"])
    head_sd = {k: _random_like(v, gen, k) for k, v in head.state_dict().items()}
    prefix = "matcher." if spec["head"] == "matcher" else ""
    criterion = {prefix + k: v for k, v in head_sd.items()}
    if spec["memory"]:
        criterion["class_memory"] = torch.randn(num_classes, 16, height // 16, width // 16, generator=gen)
    if spec["valid"]:
        criterion["valid_class"] = torch.ones(num_classes)
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    optim = torch.optim.SGD([{"params": [p], "lr": 0.001} for p in params], lr=0.01, momentum=0.9, nesterov=True)
    state = {"model": model, "criterion": criterion, "optim": optim.state_dict(), "epoch": 7}
    if spec["extra"]:
        state.update(final_epochs=12, base_loss=1.75, lr_stepped=True)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "checkpoint.pth.tar")
    torch.save(state, path)
    return path, state, head_sd


CASES = [("v1.0", "resnet50", None), ("v1.1", "resnet18", "a"), ("v1.1", "resnet34", "b"),
         ("v1.2", "resnet34", "a"), ("v2.0", "resnet50", "a"), ("v2.0", "resnet18", None),
         ("v2.1", "resnet50", "b"), ("v2.1", "resnet18", "a"), ("v2.1", "resnet34", None)]


@pytest.mark.parametrize("release,arch,ibn", CASES)
def test_public_checkpoints_load_with_the_backbone_inferred(tmp_path, gen, release, arch, ibn):
    path, state, head_sd = public_checkpoint(str(tmp_path / "run"), release, arch, ibn, gen)
    trained = load_trained(str(tmp_path / "run"), height=H, width=W)   # a folder: finds the file
    backbone, head, cfg = trained
    spec = RELEASES[release]
    assert cfg["checkpoint"] == path
    assert {k: cfg[k] for k in ("arch", "ibn", "neck", "neck_type", "final_layer", "layout")} == dict(
        arch=arch, ibn=ibn, neck=16, neck_type=spec["neck_type"], final_layer="layer3", layout=spec["layout"])
    assert cfg["preprocess"] == "public" and cfg["source"] == "public"
    assert cfg["public_version"] == VERSION_LABEL[release]
    assert trained.preprocess == "public" and not backbone.training and not head.training
    loaded = backbone.state_dict()
    for k, v in state["model"].items():
        if k.startswith(("base.layer4.", "base.fc.")):
            assert k not in loaded
        else:
            assert torch.equal(loaded[k], v), k
    for k, v in head_sd.items():
        assert torch.equal(head.state_dict()[k], v), k
    # features use the public preset: bicubic resize, [0, 1], no mean/std
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 30, 3), dtype=np.uint8))
    img_path = str(tmp_path / "a.png")
    img.save(img_path)
    with torch.no_grad():
        ref = backbone(build_test_transform(H, W, "public")(img)[None])
    assert torch.equal(extract_features(backbone, [img_path], H, W, progress=False, preprocess=trained.preprocess), ref)


def _shapes(**kwargs) -> dict:
    """The state dict of a backbone, as shapes only (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return build_backbone(**kwargs).state_dict()


def test_infer_backbone_reads_depth_ibn_and_neck():
    for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "small"):
        for neck_type in ("bn", "bias"):
            ibns = (None, "a", "b") if arch not in ("resnet152", "small") else (None,)
            for ibn in ibns:
                got = infer_backbone(_shapes(arch=arch, neck=32, ibn=ibn, neck_type=neck_type))
                assert got == dict(arch=arch, ibn=ibn, neck=32, neck_type=neck_type, neck_kernel=3,
                                   final_layer="layer3"), (arch, ibn, neck_type)
    layer4 = _shapes(arch="resnet50", neck=8, final_layer="layer4", neck_kernel=1)
    got = infer_backbone({"module." + k: v for k, v in layer4.items()})
    assert got["final_layer"] == "layer4" and got["neck_kernel"] == 1
    no_neck = infer_backbone(_shapes(arch="resnet18", neck=0))
    assert no_neck["neck"] == 0 and no_neck["final_layer"] == "layer3"


def _save(path, state):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return path


def test_what_does_not_fit_is_named_in_one_line(tmp_path, gen):
    path, state, _ = public_checkpoint(str(tmp_path / "ok"), "v2.1", "resnet18", "b", gen)

    def error(model=None, **extra):
        bad = dict(state, model=model if model is not None else state["model"], **extra)
        p = _save(str(tmp_path / f"bad{len(os.listdir(tmp_path))}" / "checkpoint.pth.tar"), bad)
        with pytest.raises(CheckpointError) as err:
            load_trained(p, height=H, width=W)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(p), msg
        return msg

    # an architecture this package does not build: bottleneck blocks 3-4-5
    odd = {k: v for k, v in state["model"].items() if not k.startswith("base.layer")}
    odd.update({f"base.layer{s}.{i}.conv3.weight": torch.zeros(1) for s, n in ((1, 3), (2, 4), (3, 5)) for i in range(n)})
    assert "unsupported backbone: bottleneck blocks per stage (3, 4, 5)" in error(odd)
    # a trunk of the right depth but other widths (e.g. a wide ResNet): the shapes are named
    wide = dict(state["model"])
    wide["base.layer1.0.conv1.weight"] = torch.zeros(128, 64, 3, 3)
    msg = error(wide)
    assert "does not fit resnet18 (IBN-b), bias neck" in msg and "base.layer1.0.conv1.weight" in msg
    # a neck with both a bias and a BatchNorm, and one with neither
    both = dict(state["model"], **{"neck_bn.weight": torch.ones(16)})
    assert "unsupported neck: neck_conv with a bias and neck_bn" in error(both)
    neither = {k: v for k, v in state["model"].items() if k != "neck_conv.bias"}
    assert "unsupported neck: neck_conv without a bias and without neck_bn" in error(neither)
    # no trunk at all, and a trunk with an extra layer
    assert "no trunk (no base.* entries)" in error({"conv.weight": torch.zeros(1)})
    extra = dict(state["model"], **{"base.layer2.0.extra.weight": torch.zeros(3)})
    assert "1 unexpected entries (e.g. base.layer2.0.extra.weight)" in error(extra)
    # a bare state dict (e.g. ImageNet weights) is not a training checkpoint
    bare = _save(str(tmp_path / "w" / "resnet18.pth"), {"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"resnet18.pth is not a QAConv training checkpoint: it has no 'model' "
                                              r"entry \(it holds conv1.weight, fc.bias\)$"):
        load_trained(bare)


def test_folders_find_both_names_and_prefer_this_packages(tmp_path, gen):
    folder = tmp_path / "run"
    path, _, _ = public_checkpoint(str(folder), "v1.2", "resnet18", None, gen)
    assert find_checkpoint(str(folder)) == path
    own = folder / "checkpoint.pt"
    own.write_bytes(b"")
    assert find_checkpoint(str(folder)) == str(own)
    assert find_checkpoint(str(tmp_path / "nothing")) is None


def test_public_checkpoint_through_the_commands(tmp_path, gen):
    from qaconv_ext import cli
    from qaconv_ext.cli import match

    folder = tmp_path / "public"
    path, _, _ = public_checkpoint(str(folder), "v2.1", "resnet18", "b", gen, height=384, width=128)
    backbone, head, cfg = match.load_qaconv(str(folder))
    assert cfg["ibn"] == "b" and head.layout == "v2"
    with pytest.raises(SystemExit, match=r"was written by the public QAConv code; it can be evaluated .* but not "
                                         r"resumed here$"):
        cli.main(["train", "--dataset", "market1501", "--data-root", str(tmp_path), "--checkpoint-dir", str(folder),
                  "--resume"])


def test_own_checkpoints_record_their_preset(tmp_path, gen):
    """Checkpoints of this package keep the preset they were trained with; older ones (no preset in the
    config) were trained with ImageNet mean/std, and evaluation uses that."""
    from qaconv_ext.engine import TrainConfig, build_model

    cfg = TrainConfig(arch="small", neck=16, height=H, width=W, preprocess="imagenet")
    backbone, criterion = build_model(cfg, 3)
    state = {"format": "qaconv-ext/1", "epoch": 1, "model": backbone.state_dict(),
             "head": criterion.matcher.state_dict(), "criterion": criterion.state_dict(), "config": cfg.to_dict()}
    new = _save(str(tmp_path / "new" / "checkpoint.pt"), state)
    old_cfg = {k: v for k, v in cfg.to_dict().items() if k not in ("preprocess", "augment", "ibn", "neck_type")}
    old = _save(str(tmp_path / "old" / "checkpoint.pt"), dict(state, config=old_cfg))
    public_cfg = dict(cfg.to_dict(), preprocess="public")
    pub = _save(str(tmp_path / "pub" / "checkpoint.pt"), dict(state, config=public_cfg))
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 30, 3), dtype=np.uint8))
    img_path = str(tmp_path / "b.png")
    img.save(img_path)
    for path, preset in ((new, "imagenet"), (old, "imagenet"), (pub, "public")):
        trained = load_trained(path)
        model, _, loaded = trained
        assert loaded["preprocess"] == trained.preprocess == preset and loaded["source"] == "qaconv-ext" and "public_version" not in loaded
        with torch.no_grad():
            ref = model(build_test_transform(H, W, preset)(img)[None])
        assert torch.equal(extract_features(model, [img_path], H, W, progress=False, preprocess=trained.preprocess), ref)
    assert load_trained(old, preprocess="public")[2]["preprocess"] == "public"
    with pytest.raises(ValueError, match="^unknown preprocess 'raw'; valid: public, imagenet$"):
        load_trained(old, preprocess="raw")


def test_train_refuses_ibn_for_trunks_without_it(tmp_path):
    from qaconv_ext import cli

    with pytest.raises(SystemExit, match=r"^qaconv train: --ibn b: IBN-Net exists for resnet18, resnet34, resnet50, "
                                         r"resnet101, not for --arch resnet152$"):
        cli.main(["train", "--dataset", "market1501", "--data-root", str(tmp_path), "--arch", "resnet152", "--ibn", "b",
                  "--checkpoint-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_resume_names_trunk_and_preset_conflicts(tmp_path):
    """--resume takes ibn/neck type/preset from the checkpoint; a plain trunk conflicts with --ibn b, and a
    checkpoint from before the presets counts as imagenet."""
    import argparse

    from qaconv_ext.cli.train import RUN_OPTIONS, RunPlan, plan_run, settle_run_options

    def args(**given):
        return argparse.Namespace(**{k: given.get(k) for k in RUN_OPTIONS}, dataset=None, data_root=None,
                                  combine_all=None, skip_bad_images=None)

    def resumed(saved):
        return RunPlan(checkpoint_dir=str(tmp_path), resume="checkpoint.pt", done=1,
                       saved={"dataset": "market1501", "epochs": 2, **saved})

    plain = {"arch": "resnet50", "ibn": None, "neck_type": "bn", "preprocess": "public"}
    with pytest.raises(SystemExit, match=r"--ibn: none in the checkpoint, b given"):
        settle_run_options(args(ibn="b"), resumed(plain))
    a = args()
    notes = settle_run_options(a, resumed(plain))
    assert (a.ibn, a.neck_type, a.preprocess) == (None, "bn", "public") and "--neck-type bn" in notes[0]
    assert "--ibn none" in notes[0]
    settle_run_options(args(ibn="none"), resumed(plain))   # the plain trunk given again: no conflict
    with pytest.raises(SystemExit, match=r"--preprocess: imagenet in the checkpoint, public given"):
        settle_run_options(args(preprocess="public"), resumed({"arch": "small", "preprocess": "imagenet"}))
    old = _save(str(tmp_path / "old" / "checkpoint.pt"), {"format": "qaconv-ext/1", "model": {},
                                                           "config": {"arch": "small"}})
    got = plan_run(argparse.Namespace(resume=old, checkpoint_dir=None, overwrite=False))
    assert got.saved["preprocess"] == "imagenet" and got.checkpoint_dir == str(tmp_path / "old")
