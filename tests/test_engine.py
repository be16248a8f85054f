"""Training loop: exact resume, atomic checkpoints, weights_only loading, optimiser groups; scoring helpers."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from helpers import rel_err, unit_maps, write_train_records
from qaconv_ext import QAConv
from qaconv_ext.data import Record
from qaconv_ext.engine import (
    TrainConfig,
    Trainer,
    build_model,
    build_optimizer,
    build_scheduler,
    build_train_loader,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from qaconv_ext.engine import checkpoint as ckpt_mod
from qaconv_ext.evaluation import rank_metrics, score_blocks, self_score_blocks

pytest.importorskip("PIL.Image")

H, W = 32, 16


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    """24 small JPEGs, 6 identities x 4 images, two cameras."""
    return write_train_records(tmp_path_factory.mktemp("tiny"), seed=0, size=(H, W), time_of=lambda pid, k: 10 * pid + k)


def _cfg(**kw) -> TrainConfig:
    base = dict(arch="small", neck=16, height=H, width=W, epochs=2, batch_size=8, lr=0.05, step_size=1,
                workers=0, seed=3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _trainer(cfg: TrainConfig, records, ckdir=None):
    seed_everything(cfg.seed)
    model, crit = build_model(cfg, 6)
    gen = torch.Generator()
    gen.manual_seed(cfg.seed)
    loader = build_train_loader(records, cfg, gen)
    opt = build_optimizer(model, crit, cfg.lr, cfg.trunk_lr_mult, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    sched = build_scheduler(opt, cfg.step_size, cfg.gamma)
    tr = Trainer(model, crit, opt, sched, device=cfg.device, amp=cfg.amp, loader_generator=gen,
                 checkpoint_dir=ckdir, config=cfg, freeze_bn=cfg.freeze_bn, progress=False, log=lambda s: None)
    return tr, loader


def _all_state(tr: Trainer) -> dict:
    out = {"model." + k: v for k, v in tr.model.state_dict().items()}
    out.update({"crit." + k: v for k, v in tr.criterion.state_dict().items()})
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_mixed_precision_training(tiny_records, device, monkeypatch):
    """amp: bfloat16 autocast on the CPU (no loss scaling; the matching runs the CPU kernel's bfloat16 path),
    float16 with a GradScaler on CUDA."""
    cfg = _cfg(amp=True, epochs=1, device=device)
    tr, loader = _trainer(cfg, tiny_records)
    assert tr.amp and tr.amp_dtype == (torch.bfloat16 if device == "cpu" else torch.float16)
    assert (tr.scaler is None) == (device == "cpu")
    seen = []
    conv = next(m for m in tr.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    before = {k: v.detach().clone() for k, v in tr.model.state_dict().items() if v.is_floating_point()}
    matched = []
    real_match = torch.ops.qaconv_ext.match
    monkeypatch.setattr(torch.ops.qaconv_ext, "match",
                        lambda q, g, *rest: (matched.append((q.dtype, g.dtype)), real_match(q, g, *rest))[1])
    (hist,) = tr.fit(loader, 1)
    monkeypatch.undo()
    assert seen and all(d == tr.amp_dtype for d in seen)
    if device == "cpu":  # the forward matches bfloat16 maps
        assert matched and set(matched) == {(torch.bfloat16, torch.bfloat16)}
    assert np.isfinite(hist["loss"]) and hist["loss"] > 0
    after = tr.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step updated the weights
    assert tr.criterion.class_memory.dtype == torch.float32 and bool(tr.criterion.valid_class.any())
    # the trunk runs in low precision, the neck and the normalisation (the matched features) in float32
    images = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.autocast(device_type=device, dtype=tr.amp_dtype):
        fea = tr.model(images)
    assert fea.dtype == torch.float32
    assert torch.allclose(fea.norm(dim=1), torch.ones_like(fea[:, 0]), atol=1e-5)
    off, _ = _trainer(_cfg(epochs=1), tiny_records)
    assert not off.amp  # the CPU default stays float32


@pytest.mark.parametrize("method", ["qaconv", "baseline"])
def test_resume_continues_exactly(tiny_records, tmp_path, method):
    cfg = _cfg(method=method)
    straight, loader = _trainer(cfg, tiny_records)
    straight.fit(loader, 2)

    first, loader1 = _trainer(cfg, tiny_records, str(tmp_path))
    first.fit(loader1, 1)
    path = first.checkpoint_path
    assert os.path.isfile(path)
    del first
    torch.manual_seed(12345)   # a fresh process: other RNG states, other initial weights
    np.random.seed(7)
    second, loader2 = _trainer(cfg.replace(seed=99), tiny_records, str(tmp_path))
    second.config.update(seed=cfg.seed)   # the run's settings are the checkpoint's; only the process state differs
    assert second.resume(str(tmp_path)) == 1
    second.fit(loader2, 2)

    a, b = _all_state(straight), _all_state(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert second.scheduler.state_dict() == straight.scheduler.state_dict()
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.1 ** 2)
    assert [h["loss"] for h in second.history] == [h["loss"] for h in straight.history]


def test_checkpoint_is_weights_only_loadable_and_complete(tiny_records, tmp_path):
    tr, loader = _trainer(_cfg(epochs=1), tiny_records, str(tmp_path))
    tr.fit(loader, 1)
    ck = torch.load(tr.checkpoint_path, weights_only=True)
    assert ck["epoch"] == 1
    for key in ("model", "head", "criterion", "optimizer", "scheduler", "rng", "config", "history"):
        assert key in ck, key
    assert "class_memory" in ck["criterion"] and "fc.weight" in ck["head"]
    assert ck["config"]["arch"] == "small" and ck["config"]["height"] == H
    # what `qaconv match`/`rank` need: backbone under "model", head under "head", input size in "config"
    head = QAConv(16, ck["criterion"]["class_memory"].shape[2], ck["criterion"]["class_memory"].shape[3])
    head.load_state_dict(ck["head"])


def test_atomic_save_survives_a_failure_mid_save(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    good = {"epoch": 1, "w": torch.arange(5.0)}
    save_checkpoint(good, path)

    def broken_save(obj, fh, *a, **kw):
        fh.write(b"PK\x03\x04 partial bytes of a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(5)}, path)
    monkeypatch.undo()
    back = load_checkpoint(path)
    assert back["epoch"] == 1 and torch.equal(back["w"], good["w"])
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


def test_atomic_save_interrupted(tmp_path, monkeypatch):
    """A KeyboardInterrupt during the write also leaves the previous checkpoint intact."""
    path = str(tmp_path / "c.pt")
    save_checkpoint({"epoch": 3}, path)

    def interrupted(obj, fh, *a, **kw):
        fh.write(b"garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 4}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 3 and os.listdir(tmp_path) == ["c.pt"]


def test_unreadable_checkpoints_are_named(tmp_path):
    """Not a checkpoint, a damaged one, one that safe loading refuses, a folder without checkpoint.pt."""
    notes = tmp_path / "notes.md"
    notes.write_text("# notes\n")
    with pytest.raises(ckpt_mod.CheckpointError, match=r"notes.md is not a PyTorch checkpoint$"):
        load_checkpoint(str(notes))
    good = tmp_path / "good.pt"
    save_checkpoint({"config": {"arch": "small"}, "w": torch.ones(3)}, str(good))
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ckpt_mod.CheckpointError, match="cut.pt is not a readable PyTorch checkpoint"):
        load_checkpoint(str(tmp_path / "cut.pt"))
    torch.save({"x": np.float64(1.0)}, tmp_path / "objects.pt")
    with pytest.raises(ckpt_mod.CheckpointError, match="weights_only.*numpy") as err:
        load_checkpoint(str(tmp_path / "objects.pt"))
    assert "\n" not in str(err.value) and "will likely succeed" not in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"has no checkpoint.pt; it holds cut.pt, good.pt, objects.pt"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(ckpt_mod.CheckpointError, match="has no checkpoint.pt"):
        ckpt_mod.load_trained(str(tmp_path))
    assert load_checkpoint(str(good), mmap=True)["config"] == {"arch": "small"}


def test_optimizer_groups_and_schedule():
    cfg = _cfg(pretrained=None)
    model, crit = build_model(cfg, 6)
    opt = build_optimizer(model, crit, 0.01, 0.1)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["trunk", "new", "criterion"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.001, 0.01, 0.01])
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    n_trunk = sum(p.numel() for p in opt.param_groups[0]["params"])
    assert n_trunk == sum(p.numel() for p in model.base.parameters())
    sched = build_scheduler(opt, 2)
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.001)
    assert cfg.trunk_lr_mult == 1.0 and cfg.replace(pretrained="x.pth").trunk_lr_mult == 0.1


def test_freeze_bn_keeps_backbone_statistics(tiny_records):
    tr, loader = _trainer(_cfg(freeze_bn=True), tiny_records)
    before = tr.model.base.bn1.running_mean.clone()
    tr.train_epoch(loader)
    assert torch.equal(before, tr.model.base.bn1.running_mean)
    assert tr.criterion.matcher.bn.num_batches_tracked.item() > 0  # the head still learns its statistics


def test_chunked_scores_equal_head(gen):
    head = QAConv(8, 3, 2).eval()
    with torch.no_grad():
        head.fc.weight.copy_(torch.randn(1, 6, generator=gen))
        head.bn.running_var.fill_(0.3)
    q = unit_maps(5, 8, 3, 2, generator=gen)
    g = unit_maps(11, 8, 3, 2, generator=gen)
    with torch.no_grad():
        full = head(q, g)
    chunked = score_blocks(head, q, g, query_chunk=2, gallery_chunk=4, progress=False)
    assert rel_err(chunked, full) < 1e-6
    self_full = head(g, g).detach()
    sym = self_score_blocks(head, g, chunk=3, progress=False)
    assert rel_err(sym, self_full) < 1e-6


def test_rank_metrics_on_a_toy():
    q = [Record("q0", 1, 0), Record("q1", 2, 0)]
    g = [Record("g0", 1, 1), Record("g1", 2, 1), Record("g2", 3, 1), Record("g3", 1, 0)]
    dist = torch.tensor([[0.1, 0.5, 0.3, 0.0],     # g3 same pid + camera: junk; g0 first -> AP 1
                         [0.2, 0.4, 0.1, 0.9]])    # first match (g1) at rank 3 -> AP 1/3
    m = rank_metrics(dist, q, g)
    assert m["rank1"] == 0.5 and m["rank5"] == 1.0
    assert m["mAP"] == pytest.approx((1 + 1 / 3) / 2)


def test_resume_checks_the_settings_as_the_command_does(tiny_records, tmp_path):
    """Trainer.resume and run_training(resume=...) refuse what ``qaconv train --resume`` refuses: another
    setting than the checkpoint's, and a number of epochs not beyond the epochs done."""
    from qaconv_ext.engine import ResumeConflict, run_training

    cfg = _cfg(epochs=1)
    first, loader = _trainer(cfg, tiny_records, str(tmp_path))
    first.fit(loader, 1)
    other, _ = _trainer(cfg.replace(lr=0.5, epochs=2), tiny_records, str(tmp_path / "other"))
    with pytest.raises(ResumeConflict, match=r"these differ: --lr: 0\.05 in the checkpoint, 0\.5 given"):
        other.resume(str(tmp_path))
    done, _ = _trainer(cfg, tiny_records, str(tmp_path / "done"))
    with pytest.raises(ResumeConflict, match=r"has already done 1 epoch; give more than 1"):
        done.resume(str(tmp_path))
    with pytest.raises(ResumeConflict, match=r"--augment: eccv in the checkpoint, v2 given"):
        run_training(cfg.replace(augment="v2", epochs=2), tiny_records, 6, checkpoint_dir=str(tmp_path / "r"),
                     resume=str(tmp_path), progress=False, log=lambda s: None)
    again, loader2 = _trainer(cfg.replace(epochs=2), tiny_records, str(tmp_path / "again"))
    assert again.resume(str(tmp_path)) == 1   # more epochs: the one change allowed
