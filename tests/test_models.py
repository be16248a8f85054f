"""Backbones: torchvision-compatible names and sizes, local pretrained weights, public checkpoints, baseline."""
from __future__ import annotations

import pytest
import torch

from qaconv_ext import QAConv, build_backbone
from qaconv_ext.engine import load_public_qaconv
from qaconv_ext.head import head_from_state_dict
from qaconv_ext.models import (
    FeatureMapAdapter,
    GAPCosine,
    feature_map_size,
    gap_features,
    load_pretrained,
    resnet,
)

# torchvision's parameter counts (weights of the whole classifier network, fc included)
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "resnet152": 60_192_808}
FC_IN = {"resnet18": 512, "resnet50": 2048, "resnet152": 2048}


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_trunk_sizes_match_torchvision(name):
    trunk = resnet(name, "layer4")
    n = sum(p.numel() for p in trunk.parameters()) + FC_IN[name] * 1000 + 1000
    assert n == TORCHVISION_PARAMS[name]


def test_resnet50_names_follow_torchvision():
    sd = build_backbone("resnet50").state_dict()
    expected = {
        "base.conv1.weight": (64, 3, 7, 7), "base.bn1.running_mean": (64,),
        "base.layer1.0.conv1.weight": (64, 64, 1, 1), "base.layer1.0.conv3.weight": (256, 64, 1, 1),
        "base.layer1.0.downsample.0.weight": (256, 64, 1, 1), "base.layer1.0.downsample.1.weight": (256,),
        "base.layer2.0.conv2.weight": (128, 128, 3, 3), "base.layer3.5.bn3.weight": (1024,),
        "neck_conv.weight": (128, 1024, 3, 3), "neck_bn.running_var": (128,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith(("base.layer4", "base.fc")) for k in sd)


def test_layer3_stride_and_unit_norm(gen):
    m = build_backbone("resnet18", neck=32).eval()
    assert feature_map_size(m, 64, 32) == (32, 4, 2)
    small = build_backbone("small", neck=16).eval()
    assert feature_map_size(small, 64, 32) == (16, 8, 4)
    with torch.no_grad():
        out = small(torch.randn(2, 3, 64, 32, generator=gen))
    assert torch.allclose(out.norm(dim=1), torch.ones(2, 8, 4), atol=1e-5)


def _torchvision_like_state(name: str, gen: torch.Generator) -> dict:
    """A state dict shaped like torchvision's ``resnetXX().state_dict()`` (random values)."""
    trunk = resnet(name, "layer4")
    sd = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
          for k, v in trunk.state_dict().items()}
    sd["fc.weight"] = torch.randn(1000, FC_IN[name], generator=gen)
    sd["fc.bias"] = torch.randn(1000, generator=gen)
    return sd


@pytest.mark.parametrize("wrap", ["plain", "module", "nested"])
def test_imagenet_weights_from_local_file(tmp_path, gen, wrap):
    sd = _torchvision_like_state("resnet18", gen)
    obj = sd
    if wrap == "module":
        obj = {"module." + k: v for k, v in sd.items()}
    elif wrap == "nested":
        obj = {"state_dict": sd, "epoch": 90}
    path = tmp_path / "resnet18.pth"
    torch.save(obj, path)
    m = build_backbone("resnet18", pretrained_path=str(path), neck=16)
    own = m.base.state_dict()
    for k, v in own.items():
        assert torch.equal(v, sd[k]), k


def test_pretrained_errors(tmp_path, gen):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_backbone("small", pretrained_path=str(tmp_path / "missing.pth"))
    sd = _torchvision_like_state("resnet18", gen)
    del sd["layer2.0.conv1.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing"):
        build_backbone("resnet18", pretrained_path=str(tmp_path / "partial.pth"))
    torch.save(_torchvision_like_state("resnet18", gen), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="wrong --arch"):
        build_backbone("resnet50", pretrained_path=str(tmp_path / "r18.pth"))


def test_public_qaconv_checkpoint_loads(tmp_path, gen):
    """The public code saves {'model': ResNet (base incl. layer4/fc, neck), 'criterion': ClassMemoryLoss}."""
    src = build_backbone("resnet18", neck=16)
    model_sd = {("base." + k): v for k, v in _torchvision_like_state("resnet18", gen).items()}
    model_sd.update({k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                     for k, v in src.state_dict().items() if not k.startswith("base.")})
    head = QAConv(16, 4, 2)
    crit = {"matcher." + k: v for k, v in head.state_dict().items()}
    crit.update(class_memory=torch.zeros(5, 16, 4, 2), valid_class=torch.zeros(5))
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"model": model_sd, "criterion": crit, "optim": {"state": {}, "param_groups": []}, "epoch": 15}, path)

    backbone_sd, head_sd = load_public_qaconv(str(path))
    m = build_backbone("resnet18", neck=16)
    m.load_state_dict(backbone_sd)          # strict: layer4/fc entries are dropped by the backbone
    assert torch.equal(m.neck_conv.weight, model_sd["neck_conv.weight"])
    assert torch.equal(m.base.layer3[1].conv2.weight, model_sd["base.layer3.1.conv2.weight"])
    h = head_from_state_dict(head_sd, 16, 4, 2)
    assert h.layout == "v2" and torch.equal(h.fc.weight, head.fc.weight)
    m.load_state_dict({"module." + k: v for k, v in m.state_dict().items()})  # DataParallel prefix


def test_any_module_as_backbone(gen):
    conv = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
    m = FeatureMapAdapter(conv, 8)
    out = m(torch.randn(2, 3, 16, 8, generator=gen))
    assert out.shape == (2, 8, 4, 2)
    assert torch.allclose(out.norm(dim=1), torch.ones(2, 4, 2), atol=1e-5)


def test_baseline(gen):
    from qaconv_ext.engine import TrainConfig, build_model

    backbone, crit = build_model(TrainConfig(method="baseline", arch="small", neck=16, height=32, width=16), 5)
    x = torch.randn(3, 3, 32, 16, generator=gen)
    fea = backbone(x)
    loss, acc = crit(fea, torch.tensor([0, 1, 4]))
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    vec = GAPCosine(backbone.eval())(x)
    assert vec.shape == (3, 16) and torch.allclose(vec.norm(dim=1), torch.ones(3), atol=1e-5)
    pooled = gap_features(fea)
    s = pooled @ pooled.t()  # cosine similarities of the pooled vectors
    assert s.shape == (3, 3) and torch.allclose(torch.diagonal(s), torch.ones(3), atol=1e-5)


def test_unknown_arch():
    with pytest.raises(KeyError, match="unknown architecture"):
        build_backbone("resnet7")
    with pytest.raises(ValueError):
        resnet("small", "layer4")  # the small trunk has three stages


def test_load_pretrained_returns_report(tmp_path, gen):
    sd = _torchvision_like_state("resnet18", gen)
    torch.save(sd, tmp_path / "w.pth")
    m = build_backbone("resnet18", neck=16)
    rep = load_pretrained(m, str(tmp_path / "w.pth"))
    assert rep["loaded"] == len(m.base.state_dict())
    assert "fc.weight" in rep["ignored"] and any(k.startswith("layer4.") for k in rep["ignored"])


def test_bad_pretrained_files_give_one_line_errors(tmp_path, gen):
    """Not a torch file, a damaged one, pickled objects, wrong keys, non-tensor entries: one line that
    names the file and what is wrong (no traceback from deep inside torch.load)."""
    from qaconv_ext.models import PretrainedWeightsError

    cases = {}
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    cases["notes.pth"] = "not a PyTorch"
    sd = _torchvision_like_state("resnet18", gen)
    torch.save(sd, tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:300])
    cases["cut.pth"] = "truncated or corrupted"
    torch.save({"w": torch.ones(2), "cfg": {"x": object}}, tmp_path / "objects.pth")
    cases["objects.pth"] = "weights_only"
    torch.save({"encoder.weight": torch.ones(2), "decoder.bias": torch.ones(3)}, tmp_path / "other.pth")
    cases["other.pth"] = "no ResNet trunk parameter"
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    cases["list.pth"] = "expected a dict"
    bad = dict(sd)
    bad["conv1.weight"] = "not a tensor"
    torch.save(bad, tmp_path / "strings.pth")
    cases["strings.pth"] = "conv1.weight is not a tensor"
    for name, what in cases.items():
        with pytest.raises(PretrainedWeightsError) as err:
            build_backbone("resnet18", pretrained_path=str(tmp_path / name))
        msg = str(err.value)
        assert "\n" not in msg and str(tmp_path / name) in msg and what in msg, (name, msg)
        assert isinstance(err.value, ValueError)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_backbone("resnet18", pretrained_path=str(tmp_path / "missing.pth"))
    with pytest.raises(PretrainedWeightsError, match="is a folder"):
        build_backbone("resnet18", pretrained_path=str(tmp_path))
