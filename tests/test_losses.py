"""Class-memory loss against a direct einsum computation of the method; cosine-softmax baseline loss."""
from __future__ import annotations

import pytest
import torch

from helpers import rel_err, unit_maps
from qaconv_ext import ClassMemoryLoss, QAConv
from qaconv_ext.losses import CosineSoftmaxLoss, focal_bce_with_logits

C, D, H, W = 7, 8, 3, 2
L = H * W


def _reference(feature, memory, valid, target, head: QAConv, gamma=2.0):
    """Loss, acc of the method written out: einsum similarities, batch-statistics head, focal BCE."""
    B = feature.shape[0]
    S = torch.einsum("bcs,kcr->bksr", feature.reshape(B, D, L), memory.reshape(C, D, L))
    v = torch.cat((S.max(dim=3).values, S.max(dim=2).values), dim=-1)          # [B, C, 2L]
    v = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + head.bn.eps) * head.bn.weight + head.bn.bias
    w, c = head.fc.weight.reshape(-1), head.fc.bias
    x = (v[..., :L] * w).sum(-1) + (v[..., L:] * w).sum(-1) + 2 * c             # shared FC, summed
    x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + head.logit_bn.eps)
    logits = x * head.logit_bn.weight + head.logit_bn.bias                        # [B, C]
    y = torch.zeros(B, C, dtype=logits.dtype)
    y[torch.arange(B), target] = 1.0
    p = torch.sigmoid(logits)
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    focal = torch.where(y > 0, 1 - p, p) ** gamma                                # not detached
    loss = (bce * focal * valid[None, :]).sum(dim=1)
    acc = (logits.argmax(dim=1) == target).to(logits.dtype)
    return loss, acc


def _make(gen, dtype=torch.float64):
    head = QAConv(D, H, W).to(dtype)
    with torch.no_grad():
        head.fc.weight.copy_(torch.randn(1, L, generator=gen, dtype=dtype))
        head.bn.weight.fill_(1.4)
        head.logit_bn.bias.fill_(-0.3)
    crit = ClassMemoryLoss(head, C, D, H, W).to(dtype)
    with torch.no_grad():  # a half-filled memory
        filled = torch.tensor([0, 2, 3, 5])
        crit.class_memory[filled] = unit_maps(4, D, H, W, dtype, gen)
        crit.valid_class[filled] = 1.0
    return crit


def test_loss_acc_and_gradients_match_direct_computation(gen):
    crit = _make(gen)
    ref_head = QAConv(D, H, W).double()
    ref_head.load_state_dict(crit.matcher.state_dict())
    memory, valid = crit.class_memory.clone(), crit.valid_class.clone()
    feature = unit_maps(5, D, H, W, torch.float64, gen).requires_grad_()
    feature2 = feature.detach().clone().requires_grad_()
    target = torch.tensor([0, 2, 6, 2, 4])
    loss, acc = crit(feature, target)
    ref_loss, ref_acc = _reference(feature2, memory, valid, target, ref_head)
    assert loss.shape == (5,) and acc.shape == (5,)
    assert rel_err(loss.detach(), ref_loss.detach()) < 1e-12
    assert torch.equal(acc, ref_acc)
    loss.mean().backward()
    ref_loss.mean().backward()
    assert rel_err(feature.grad, feature2.grad) < 1e-10
    ref_params = dict(ref_head.named_parameters())
    for name, p in crit.matcher.named_parameters():
        assert torch.allclose(p.grad, ref_params[name].grad, rtol=1e-9, atol=1e-12), name


def test_memory_replacement_after_the_loss(gen):
    crit = _make(gen)
    feature = unit_maps(4, D, H, W, torch.float64, gen)
    target = torch.tensor([1, 3, 1, 6])     # class 1 twice: the later sample wins
    before_valid = crit.valid_class.clone()
    crit(feature, target)
    assert torch.equal(crit.class_memory[1], feature[2])
    assert torch.equal(crit.class_memory[3], feature[1])
    assert torch.equal(crit.class_memory[6], feature[3])
    assert crit.valid_class.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert before_valid[1] == 0 and not crit.class_memory.requires_grad


def test_memory_is_the_detached_gallery_side(gen):
    crit = _make(gen)
    feature = unit_maps(3, D, H, W, torch.float64, gen).requires_grad_()
    loss, _ = crit(feature, torch.tensor([0, 1, 2]))
    loss.sum().backward()
    assert feature.grad is not None and crit.class_memory.grad is None


def test_invalid_classes_do_not_count(gen):
    crit = ClassMemoryLoss(QAConv(D, H, W).double(), C, D, H, W).double()
    feature = unit_maps(4, D, H, W, torch.float64, gen)
    loss, acc = crit(feature, torch.tensor([0, 1, 2, 3]))  # empty memory: nothing is valid yet
    assert torch.all(loss == 0)
    loss2, _ = crit(unit_maps(4, D, H, W, torch.float64, gen), torch.tensor([0, 1, 4, 5]))
    assert torch.all(loss2 > 0)


def test_float32_and_bad_inputs(gen):
    crit = _make(gen, torch.float32)
    loss, acc = crit(unit_maps(3, D, H, W, torch.float32, gen), torch.tensor([0, 1, 2]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    with pytest.raises(ValueError, match="targets"):
        crit(unit_maps(2, D, H, W, torch.float32, gen), torch.tensor([0, C]))
    with pytest.raises(ValueError, match="memory"):
        crit(unit_maps(2, D, H + 1, W, torch.float32, gen), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="matcher was built for"):  # caught when built, not at the first batch
        ClassMemoryLoss(QAConv(D, H, W), C, D, H + 1, W)


def test_state_dict_has_memory_and_head():
    crit = ClassMemoryLoss(QAConv(D, H, W), C, D, H, W)
    keys = set(crit.state_dict())
    assert {"class_memory", "valid_class", "matcher.fc.weight", "matcher.bn.running_var",
            "matcher.logit_bn.weight"} <= keys


def test_focal_bce_formula(gen):
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    y = (torch.rand(4, 5, generator=gen) > 0.5).double()
    p = torch.sigmoid(x)
    ref = -(y * p.log() + (1 - y) * (1 - p).log()) * torch.where(y > 0, 1 - p, p) ** 2
    assert rel_err(focal_bce_with_logits(x, y), ref) < 1e-12


def test_cosine_softmax_loss(gen):
    crit = CosineSoftmaxLoss(D, C, scale=10.0)
    fea = unit_maps(4, D, H, W, torch.float32, gen)
    target = torch.tensor([0, 1, 2, 3])
    loss, acc = crit(fea, target)
    logits = crit.logits(fea)
    assert logits.abs().max() <= 10.0 + 1e-4
    assert rel_err(loss.detach(), torch.nn.functional.cross_entropy(logits, target, reduction="none").detach()) < 1e-6
    assert acc.shape == (4,)
