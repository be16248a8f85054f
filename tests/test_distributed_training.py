"""Training across 2 ranks (gloo on the CPU) against one process: the same data order, parameters,
class memory and head statistics (to float32 rounding), identical on both ranks."""
from __future__ import annotations

import pytest
import torch

import distributed_workers as workers
from qaconv_ext.distributed import ShardedBatchSampler


def test_sharded_batches_follow_the_one_process_loader_order():
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(50)), batch_size=8, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(3))
    expected = [b.tolist() for b in loader]
    for world in (1, 2, 4):
        parts = []
        for r in range(world):
            g = torch.Generator().manual_seed(3)  # the loader draws its workers' base seed from it first
            parts.append([b.tolist() for b in DataLoader(list(range(50)), generator=g,
                                                         batch_sampler=ShardedBatchSampler(50, 8, r, world, g))])
        assert all(len(p) == len(expected) == 6 for p in parts)
        joined = [sum((p[i] for p in parts), []) for i in range(len(expected))]
        assert joined == expected


def test_sharded_batches_need_a_multiple_of_the_ranks():
    with pytest.raises(ValueError, match="multiple"):
        ShardedBatchSampler(50, 9, 0, 2)


def _close(a, b, what, tol):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if x.is_floating_point():
            err = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            scale = max(1.0, y.double().abs().max().item()) if y.numel() else 1.0
            assert err <= tol * scale, f"{what}.{k}: max difference {err:.3g}"
        else:
            assert torch.equal(x, y), f"{what}.{k}"


# float64 over two epochs shows the two computations are the same (differences at the level of float64
# rounding); float32 over one epoch, to float32 rounding (it grows with the steps, as any reordering does)
RUNS = (("float64", 2, 1e-10), ("float32", 1, 2e-5))


def test_two_ranks_with_sync_bn_equal_one_process(tmp_path):
    workers.spawn(workers.training_worker, 2, str(tmp_path), True, [(d, e) for d, e, _ in RUNS])
    for dtype, epochs, tol in RUNS:
        r0 = torch.load(tmp_path / f"train_{dtype}_0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"train_{dtype}_1.pt", weights_only=True)
        for part in ("model", "criterion"):  # the ranks agree exactly
            for k in r0[part]:
                assert torch.equal(r0[part][k], r1[part][k]), f"{dtype}: {part}.{k} differs across ranks"
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            one = workers.train_steps(0, 1, None, epochs=epochs)
            init = workers.training_setup()[0].state_dict()
        finally:
            torch.set_default_dtype(torch.float32)
        ref_model, ref_crit = one.model.state_dict(), one.criterion.state_dict()
        assert ref_crit["valid_class"].sum() > 0
        _close(r0["model"], ref_model, f"{dtype} model", tol)
        # class memory, valid classes, head weights and BatchNorm statistics
        _close(r0["criterion"], ref_crit, f"{dtype} criterion", tol)
        assert r0["loss"] == pytest.approx([h["loss"] for h in one.history], rel=max(tol, 1e-12))
        assert r0["acc"] == pytest.approx([h["acc"] for h in one.history])
        moved = max((ref_model[k] - p).abs().max().item() for k, p in init.items() if p.is_floating_point())
        assert moved > 1e-2  # the comparison is not between untouched weights


def test_without_sync_bn_the_backbone_statistics_are_per_rank(tmp_path):
    """Without --sync-bn the ranks still agree on the parameters and the memory (the backbone's running
    BatchNorm statistics are each rank's own until DistributedDataParallel broadcasts rank 0's at the
    next step), but the result differs from one process by far more than rounding: the backbone's
    BatchNorms normalise each rank's 16 images by themselves."""
    workers.spawn(workers.training_worker, 2, str(tmp_path), False, [("float32", 1)])
    r0 = torch.load(tmp_path / "train_float32_0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "train_float32_1.pt", weights_only=True)
    for part in ("model", "criterion"):
        for k in r0[part]:
            if part == "criterion" or not ("running_" in k or "num_batches" in k):
                assert torch.equal(r0[part][k], r1[part][k]), f"{part}.{k}"
    one = workers.train_steps(0, 1, None, epochs=1)
    with pytest.raises(AssertionError):
        _close(r0["model"], one.model.state_dict(), "model", 1e-3)
