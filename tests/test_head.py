"""The QAConv head: layouts, state-dict keys, folding, and agreement with a direct einsum computation."""
from __future__ import annotations

import pytest
import torch

from helpers import rel_err, unit_maps
from qaconv_ext import QAConv, qaconv_match
from qaconv_ext.head import head_from_state_dict, normalize_layout


def _einsum_values(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[P, N, 2L]: per-query-location maxima, then per-gallery-location maxima (direct, materialised)."""
    P, d = q.shape[:2]
    N = g.shape[0]
    S = torch.einsum("pcs,ncr->pnsr", q.reshape(P, d, -1), g.reshape(N, d, -1))
    return torch.cat((S.max(dim=3).values, S.max(dim=2).values), dim=-1)


def _bn(x: torch.Tensor, bn: torch.nn.BatchNorm1d, training: bool) -> torch.Tensor:
    if training:
        mean, var = x.mean(), x.var(unbiased=False)
    else:
        mean, var = bn.running_mean[0], bn.running_var[0]
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight[0] + bn.bias[0]


def _reference_logits(head: QAConv, q: torch.Tensor, g: torch.Tensor, training: bool) -> torch.Tensor:
    """The head written out from the method's description, on einsum values."""
    L = head.num_locations
    v = _bn(_einsum_values(q, g), head.bn, training)
    w, c = head.fc.weight.reshape(-1), head.fc.bias[0]
    vq, vg = v[..., :L], v[..., L:]
    if head.layout == "v2":
        x = (vq * w).sum(-1) + c + (vg * w).sum(-1) + c
    else:  # one FC over [gallery-location maxima ; query-location maxima]
        x = (torch.cat((vg, vq), dim=-1) * w).sum(-1) + c
    return _bn(x, head.logit_bn, training)


def _randomise(head: QAConv, gen: torch.Generator) -> QAConv:
    with torch.no_grad():
        for bn in (head.bn, head.logit_bn):
            bn.weight.copy_(0.5 + torch.rand(1, generator=gen, dtype=bn.weight.dtype))
            bn.bias.copy_(torch.randn(1, generator=gen, dtype=bn.bias.dtype))
            bn.running_mean.copy_(torch.randn(1, generator=gen, dtype=bn.running_mean.dtype))
            bn.running_var.copy_(0.2 + torch.rand(1, generator=gen, dtype=bn.running_var.dtype))
        head.fc.weight.copy_(torch.randn(head.fc.weight.shape, generator=gen, dtype=head.fc.weight.dtype))
        head.fc.bias.copy_(torch.randn(1, generator=gen, dtype=head.fc.bias.dtype))
    return head


@pytest.mark.parametrize("layout", ["v2", "eccv"])
def test_state_dict_keys_and_shapes(layout):
    head = QAConv(32, 6, 4, layout=layout)
    keys = set(head.state_dict())
    expected = {f"{m}.{k}" for m in ("bn", "logit_bn")
                for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    expected |= {"fc.weight", "fc.bias"}
    assert keys == expected
    L = 24
    assert head.fc.weight.shape == ((1, L) if layout == "v2" else (1, 2 * L))
    if layout == "v2":
        assert torch.all(head.fc.weight == 1.0 / L)


def test_layout_names():
    assert normalize_layout("v2.1") == "v2" and normalize_layout("ECCV") == "eccv" and normalize_layout("v1") == "eccv"
    with pytest.raises(ValueError):
        normalize_layout("v3")


@pytest.mark.parametrize("layout", ["v2", "eccv"])
def test_folded_eval_equals_unfolded_float64(layout, gen):
    head = _randomise(QAConv(16, 4, 3, layout=layout).double(), gen).eval()
    q = unit_maps(5, 16, 4, 3, torch.float64, gen)
    g = unit_maps(7, 16, 4, 3, torch.float64, gen)
    with torch.no_grad():
        folded = head(q, g)                                 # fused qaconv_score with the folded head
        unfolded = head.head(qaconv_match(q, g))            # BN -> FC -> BN on the op's values
        ref = _reference_logits(head, q, g, training=False)  # written out on einsum values
    assert folded.dtype == torch.float64 and folded.shape == (5, 7)
    assert rel_err(folded, unfolded) < 1e-12
    assert rel_err(folded, ref) < 1e-12
    with torch.no_grad():
        weight, bias = head.folded()
    assert weight.shape == (24,) and bias.dim() == 0
    assert rel_err(_einsum_values(q, g) @ weight + bias, ref) < 1e-12


@pytest.mark.parametrize("layout", ["v2", "eccv"])
def test_train_mode_matches_reference_values_and_grads(layout, gen):
    head = _randomise(QAConv(8, 3, 2, layout=layout).double(), gen).train()
    ref_head = _randomise(QAConv(8, 3, 2, layout=layout).double(), gen).train()
    ref_head.load_state_dict(head.state_dict())
    q = unit_maps(4, 8, 3, 2, torch.float64, gen).requires_grad_()
    g = unit_maps(6, 8, 3, 2, torch.float64, gen).requires_grad_()
    q2, g2 = q.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
    out = head(q, g)
    ref = _reference_logits(ref_head, q2, g2, training=True)
    assert rel_err(out.detach(), ref.detach()) < 1e-12
    up = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * up).sum().backward()
    (ref * up).sum().backward()
    assert rel_err(q.grad, q2.grad) < 1e-10 and rel_err(g.grad, g2.grad) < 1e-10
    ref_params = dict(ref_head.named_parameters())
    for name, p in head.named_parameters():  # some of these are ~0 (BN after BN): compare absolutely
        assert torch.allclose(p.grad, ref_params[name].grad, rtol=1e-9, atol=1e-12), name
    # running statistics were updated from the batch
    assert head.bn.num_batches_tracked.item() == 1 and float(head.bn.running_mean) != 0.0


def test_v2_is_symmetric_and_eccv_is_not(gen):
    q = unit_maps(3, 8, 3, 2, torch.float64, gen)
    g = unit_maps(4, 8, 3, 2, torch.float64, gen)
    v2 = _randomise(QAConv(8, 3, 2, "v2").double(), gen).eval()
    eccv = _randomise(QAConv(8, 3, 2, "eccv").double(), gen).eval()
    with torch.no_grad():
        assert rel_err(v2(q, g), v2(g, q).t()) < 1e-12
        assert rel_err(eccv(q, g), eccv(g, q).t()) > 1e-6


def test_float32_eval_and_mixed_dtypes(gen):
    head = _randomise(QAConv(16, 4, 2), gen).eval()
    q = unit_maps(3, 16, 4, 2, torch.float32, gen)
    g = unit_maps(5, 16, 4, 2, torch.float32, gen)
    with torch.no_grad():
        out = head(q, g)
        assert out.dtype == torch.float32
        ref = _reference_logits(head.double(), q.double(), g.double(), training=False)
        assert rel_err(out, ref) < 1e-5
        assert rel_err(head(q.double(), g), ref) < 1e-12  # mixed dtypes are promoted


def test_folded_is_differentiable_in_head_parameters(gen):
    head = _randomise(QAConv(8, 2, 2).double(), gen).eval()
    q = unit_maps(2, 8, 2, 2, torch.float64, gen)
    g = unit_maps(3, 8, 2, 2, torch.float64, gen)
    head(q, g).sum().backward()
    assert head.fc.weight.grad is not None and head.logit_bn.weight.grad is not None


def test_bad_inputs_name_the_problem():
    head = QAConv(16, 4, 2)
    ok = torch.zeros(2, 16, 4, 2)
    with pytest.raises(ValueError, match="channels"):
        head(torch.zeros(2, 8, 4, 2), ok)
    with pytest.raises(ValueError, match="4x2"):
        head(ok, torch.zeros(2, 16, 4, 4))
    with pytest.raises(ValueError, match="2x4 map, the head was built for 4x2"):  # same L, other shape
        head(ok, torch.zeros(2, 16, 2, 4))
    with pytest.raises(ValueError, match="4-D|\\[B, d, h, w\\]"):
        head(torch.zeros(16, 4, 2), ok)


@pytest.mark.parametrize("layout,prefix", [("v2", "matcher."), ("eccv", "")])
def test_load_public_checkpoint_head(layout, prefix, gen):
    """v1.3+ ClassMemoryLoss keeps the head under ``matcher.``; the ECCV-era QAConvLoss at top level."""
    src = _randomise(QAConv(16, 4, 2, layout), gen)
    state = {prefix + k: v for k, v in src.state_dict().items()}
    state["class_memory"] = torch.zeros(3, 16, 4, 2)
    state["valid_class"] = torch.zeros(3)
    head = head_from_state_dict(state, 16, 4, 2)
    assert head.layout == layout and not head.training
    for k, v in src.state_dict().items():
        assert torch.equal(head.state_dict()[k], v)
    with pytest.raises(ValueError):
        head_from_state_dict(state, 16, 3, 3)
