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


# ----------------------------------------------------------------------------------------------
# IBN-Net trunks and the two necks
# ----------------------------------------------------------------------------------------------

def _in_keys(sd):
    return sorted(k for k in sd if ".IN." in k or k.startswith("base.bn1."))


@pytest.mark.parametrize("arch,last", [("resnet50", (2, 3)), ("resnet101", (2, 3)), ("resnet18", (1, 1))])
def test_ibn_b_places_instance_norm_in_the_stem_and_after_the_last_blocks_of_stages_1_2(arch, last):
    sd = build_backbone(arch, ibn="b").state_dict()
    width = 4 if arch != "resnet18" else 1
    # the stem's bn1 is an affine InstanceNorm: weight and bias, no running statistics
    assert "base.bn1.weight" in sd and "base.bn1.running_mean" not in sd
    ins = sorted(k for k in sd if k.endswith(".IN.weight"))
    assert ins == [f"base.layer1.{last[0]}.IN.weight", f"base.layer2.{last[1]}.IN.weight"]
    assert sd[ins[0]].shape == (64 * width,) and sd[ins[1]].shape == (128 * width,)
    assert not any(".bn1.IN." in k for k in sd)


@pytest.mark.parametrize("arch", ["resnet50", "resnet101", "resnet34"])
def test_ibn_a_splits_the_first_norm_of_every_block_of_stages_1_to_3(arch):
    trunk = resnet(arch, "layer4", ibn="a")
    sd = trunk.state_dict()
    assert "bn1.running_mean" in sd                             # plain stem
    for stage, planes in ((1, 64), (2, 128), (3, 256), (4, 512)):
        layer = getattr(trunk, f"layer{stage}")
        for i in range(len(layer)):
            if stage < 4:
                assert sd[f"layer{stage}.{i}.bn1.IN.weight"].shape == (planes // 2,)
                assert sd[f"layer{stage}.{i}.bn1.BN.running_var"].shape == (planes - planes // 2,)
                assert f"layer{stage}.{i}.bn1.running_mean" not in sd
            else:
                assert f"layer{stage}.{i}.bn1.running_mean" in sd
    assert not any(k.split(".")[2:3] == ["IN"] for k in sd)


def _randomise_norms(module, gen):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.2, generator=gen)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)


def test_ibn_blocks_compute_what_ibn_net_defines(gen):
    """Float64 reference written out with torch.nn.functional: IBN-a's half-IN/half-BN first norm, IBN-b's
    InstanceNorm on the residual sum before the ReLU, IBN-b's InstanceNorm stem."""
    import torch.nn.functional as F

    def inorm(x, m):
        return F.instance_norm(x, weight=m.weight, bias=m.bias, eps=m.eps)

    def bnorm(x, m):
        return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    x = torch.randn(2, 3, 64, 32, generator=gen, dtype=torch.float64)
    for ibn in ("a", "b"):
        trunk = resnet("resnet50", "layer2", ibn=ibn).double().eval()
        _randomise_norms(trunk, gen)
        stem_norm = inorm if ibn == "b" else bnorm
        y = F.max_pool2d(F.relu(stem_norm(F.conv2d(x, trunk.conv1.weight, stride=2, padding=3), trunk.bn1)), 3, 2, 1)
        for layer in (trunk.layer1, trunk.layer2):
            for blk in layer:
                if ibn == "a":
                    h = F.conv2d(y, blk.conv1.weight)
                    half = blk.bn1.half
                    h = torch.cat([inorm(h[:, :half], blk.bn1.IN), bnorm(h[:, half:], blk.bn1.BN)], 1)
                else:
                    h = bnorm(F.conv2d(y, blk.conv1.weight), blk.bn1)
                h = F.relu(h)
                h = F.relu(bnorm(F.conv2d(h, blk.conv2.weight, stride=blk.stride, padding=1), blk.bn2))
                h = bnorm(F.conv2d(h, blk.conv3.weight), blk.bn3)
                short = y if blk.downsample is None else bnorm(
                    F.conv2d(y, blk.downsample[0].weight, stride=blk.stride), blk.downsample[1])
                h = h + short
                if blk.IN is not None:
                    h = inorm(h, blk.IN)
                y = F.relu(h)
        with torch.no_grad():
            out = trunk(x)
        assert torch.allclose(out, y, rtol=1e-10, atol=1e-10), ibn


def test_neck_types(gen):
    bn = build_backbone("resnet18", neck=16).state_dict()
    assert "neck_bn.running_mean" in bn and "neck_conv.bias" not in bn
    m = build_backbone("resnet18", neck=16, neck_type="bias").eval()
    sd = m.state_dict()
    assert "neck_conv.bias" in sd and not any(k.startswith("neck_bn") for k in sd)
    with torch.no_grad():
        m.neck_conv.bias.normal_(generator=gen)
        x = torch.randn(2, 3, 64, 32, generator=gen)
        ref = torch.nn.functional.normalize(
            torch.nn.functional.conv2d(m.base(x).double(), m.neck_conv.weight.double(), m.neck_conv.bias.double(),
                                       padding=1), dim=1)
        assert torch.allclose(m(x).double(), ref, atol=1e-5)
    with pytest.raises(ValueError, match="unknown neck_type 'gn'"):
        build_backbone("small", neck_type="gn")


def test_ibn_errors():
    with pytest.raises(ValueError, match="IBN-Net .* not for resnet152"):
        build_backbone("resnet152", ibn="a")
    with pytest.raises(ValueError, match="not for small"):
        build_backbone("small", ibn="b")
    with pytest.raises(ValueError, match="unknown IBN type 'c'"):
        build_backbone("resnet50", ibn="c")
    assert build_backbone(name="resnet18", ibn="none", neck=8).base.ibn is None   # 'name' alias, 'none'


def _ibn_imagenet_state(arch: str, ibn: str, gen: torch.Generator) -> dict:
    """A state dict laid out like IBN-Net's released ImageNet weights (whole network, fc included)."""
    trunk = resnet(arch, "layer4", ibn=ibn)
    sd = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
          for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["fc.weight"] = torch.randn(1000, trunk.out_channels, generator=gen)
    sd["fc.bias"] = torch.randn(1000, generator=gen)
    return sd


@pytest.mark.parametrize("ibn", ["a", "b"])
def test_ibn_imagenet_weights_from_local_file(tmp_path, gen, ibn):
    sd = _ibn_imagenet_state("resnet50", ibn, gen)
    path = tmp_path / f"resnet50_ibn_{ibn}.pth"
    torch.save(sd, path)
    m = build_backbone("resnet50", pretrained_path=str(path), ibn=ibn)
    for k, v in m.base.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, sd[k]), k
    with pytest.raises(ValueError, match=f"these weights are IBN-{ibn}, the trunk is a plain ResNet .*--ibn {ibn}"):
        build_backbone("resnet50", pretrained_path=str(path))
    other = "b" if ibn == "a" else "a"
    with pytest.raises(ValueError, match=f"these weights are IBN-{ibn}, the trunk is IBN-{other}"):
        build_backbone("resnet50", pretrained_path=str(path), ibn=other)
