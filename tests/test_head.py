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


# ----------------------------------------------------------------------------------------------
# The head's eval-mode algebra per max value, and building a head from a state dict
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["v2", "eccv"])
def test_slot_weights_contributions_and_logit(layout):
    gen = torch.Generator().manual_seed(11 if layout == "v2" else 12)
    head = _randomise(QAConv(8, 3, 2, layout=layout).double(), gen).eval()
    L = head.num_locations
    q = unit_maps(3, 8, 3, 2, torch.float64, gen)
    g = unit_maps(4, 8, 3, 2, torch.float64, gen)
    values = qaconv_match(q, g)  # [3, 4, 2L]
    slots, bias_total = head.slot_weights()
    w, c = head.fc.weight.detach().reshape(-1), head.fc.bias.detach()[0]
    if layout == "v2":  # the shared FC sees each direction: every weight twice, the bias twice
        assert torch.equal(slots.detach(), torch.cat((w, w))) and float(bias_total.detach()) == 2 * float(c)
    else:  # one FC over [gallery-location maxima ; query-location maxima]
        assert torch.equal(slots.detach(), torch.cat((w[L:], w[:L]))) and float(bias_total.detach()) == float(c)
    with torch.no_grad():
        contrib = head.contributions(values)
        logit = head.logit(values)
        weight, bias = head.folded()
        unfolded = head.head(values)
        scores = head(q, g)
        formula = slots.detach() * _bn(values, head.bn, training=False)
    assert contrib.shape == values.shape and contrib.dtype == torch.float64
    assert rel_err(contrib, formula) < 1e-14
    assert rel_err(logit, unfolded) < 1e-13
    assert rel_err(logit, values @ weight + bias) < 1e-13
    assert rel_err(logit, scores) < 1e-13
    # differentiable in the head's parameters, like folded()
    head.contributions(values).sum().backward()
    assert head.fc.weight.grad is not None and head.bn.weight.grad is not None
    # float32 values on a float32 head stay float32
    assert head.float().contributions(values.float()).dtype == torch.float32


def test_contributions_want_the_head_size():
    head = QAConv(8, 3, 2)
    for bad in (torch.zeros(10), torch.zeros(2, 13), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"expected 12 max values per pair.*head's height x width \(3x2\)"):
            head.contributions(bad)
    with pytest.raises(ValueError, match="expected 12 max values per pair"):
        head.head(torch.zeros(4, 10))


@pytest.mark.parametrize("layout", ["v2", "eccv"])
def test_from_state_dict_round_trip(layout):
    gen = torch.Generator().manual_seed(21 if layout == "v2" else 22)
    src = _randomise(QAConv(16, 4, 2, layout=layout), gen).eval()
    q = unit_maps(3, 16, 4, 2, torch.float32, gen)
    g = unit_maps(5, 16, 4, 2, torch.float32, gen)
    with torch.no_grad():
        want = src(q, g)
    state = src.state_dict()
    for kwargs in ({"height": 4, "width": 2},                    # layout from the FC size
                   {"height": 4, "width": 2, "layout": layout},  # all given
                   {"height": 4, "layout": layout},              # width from L = fc size (/ 2 for eccv)
                   {"width": 2, "layout": layout.upper()}):      # height likewise; any accepted spelling
        head = QAConv.from_state_dict(state, 16, **kwargs)
        assert (head.num_features, head.height, head.width, head.layout) == (16, 4, 2, layout), kwargs
        assert not head.training
        assert head.state_dict().keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(head.state_dict()[k], v), (kwargs, k)
        with torch.no_grad():
            assert torch.equal(head(q, g), want), kwargs
    # the public code's criterion: under matcher., next to the class memory; keyword names as documented
    crit = {"matcher." + k: v for k, v in state.items()}
    crit.update(class_memory=torch.zeros(3, 16, 4, 2), valid_class=torch.zeros(3))
    head = QAConv.from_state_dict(crit, num_features=16, height=4, width=2)
    assert head.layout == layout and torch.equal(head.fc.weight, src.fc.weight)


def _one_line_error(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip(), msg
    return msg


@pytest.mark.parametrize("layout", ["v2", "eccv"])
def test_from_state_dict_rejects_what_does_not_fit(layout):
    state = QAConv(16, 4, 2, layout=layout).state_dict()
    n = state["fc.weight"].numel()
    build = QAConv.from_state_dict
    # an FC of the wrong size: for the map size, and for an explicit layout
    msg = _one_line_error(ValueError, build, state, 16, 3, 3)
    assert f"fc.weight has {n} entries" in msg and "3x3" in msg
    msg = _one_line_error(ValueError, build, state, 16, 3, 3, layout=layout)
    assert "fc.weight has shape" in msg and "3x3" in msg
    msg = _one_line_error(ValueError, build, state, 16, height=3, layout=layout)  # L = 8 is not 3 rows
    assert "height 3" in msg
    # entries of the wrong shape, missing or unexpected
    for key, bad in (("bn.weight", torch.ones(2)), ("logit_bn.running_var", torch.ones(1, 1)),
                     ("fc.weight", state["fc.weight"].reshape(2, -1)), ("fc.bias", torch.zeros(2))):
        msg = _one_line_error(ValueError, build, {**state, key: bad}, 16, 4, 2)
        assert key in msg, msg
    msg = _one_line_error(KeyError, build, {k: v for k, v in state.items() if k != "logit_bn.weight"}, 16, 4, 2)
    assert "logit_bn.weight" in msg
    msg = _one_line_error(ValueError, build, {**state, "fc.scale": torch.ones(1)}, 16, 4, 2)
    assert "fc.scale" in msg
    _one_line_error(KeyError, build, {"model.conv.weight": torch.ones(1)}, 16, 4, 2)  # no head at all
    # what a state dict cannot say
    assert "num_features" in _one_line_error(ValueError, build, state, height=4, width=2)
    assert "height and width" in _one_line_error(ValueError, build, state, 16, height=4)
    assert "height or width" in _one_line_error(ValueError, build, state, 16, layout=layout)
    # num_batches_tracked may be absent (older checkpoints)
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert QAConv.from_state_dict(old, 16, 4, 2).layout == layout


def test_one_list_of_layout_names_and_one_error():
    from qaconv_ext.head import _LAYOUTS

    for name, layout in _LAYOUTS.items():
        assert QAConv(8, 2, 2, layout=name).layout == layout
        assert QAConv(8, 2, 2, layout=name.upper()).layout == layout
    expected = _one_line_error(ValueError, normalize_layout, "symmetric")
    assert "'symmetric'" in expected and "'v2' or 'eccv'" in expected
    state = QAConv(8, 2, 2).state_dict()
    assert _one_line_error(ValueError, QAConv, 8, 2, 2, layout="symmetric") == expected
    assert _one_line_error(ValueError, QAConv.from_state_dict, state, 8, 2, 2, layout="symmetric") == expected
    # a layout set on a built head is read through the same table
    head = QAConv(8, 2, 2).eval()
    head.layout = "shared"
    assert torch.equal(head.slot_weights()[0], QAConv(8, 2, 2).slot_weights()[0])
    head.layout = "symmetric"
    maps = torch.ones(1, 8, 2, 2)
    assert _one_line_error(ValueError, head.slot_weights) == expected
    assert _one_line_error(ValueError, head, maps, maps) == expected
    assert _one_line_error(ValueError, head.head, torch.zeros(8)) == expected
