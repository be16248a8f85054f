"""A diverging run stops with a clear error and never overwrites a good checkpoint; checkpoint files
get the usual mode and stale temporary files of an interrupted save are removed."""
from __future__ import annotations

import math
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from helpers import write_train_records
from qaconv_ext.engine import (MAX_BAD_STEPS, TrainConfig, Trainer, TrainingDiverged, build_model, build_optimizer,
                               build_scheduler, build_train_loader, load_checkpoint, save_checkpoint, seed_everything)

pytest.importorskip("PIL.Image")

H, W = 32, 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """24 small JPEGs, 6 identities x 4 images, two cameras."""
    return write_train_records(tmp_path_factory.mktemp("imgs"), seed=1, size=(H, W), time_of=lambda pid, k: k)


def _trainer(records, ckdir=None, batch_size=4, criterion_wrapper=None, **kw):
    cfg = TrainConfig(arch="small", neck=16, height=H, width=W, epochs=2, batch_size=batch_size, lr=0.05,
                      step_size=1, workers=0, seed=5, device="cpu")
    seed_everything(cfg.seed)
    model, crit = build_model(cfg, 6)
    if criterion_wrapper is not None:
        crit = criterion_wrapper(crit)
    gen = torch.Generator()
    gen.manual_seed(cfg.seed)
    loader = build_train_loader(records, cfg, gen)
    opt = build_optimizer(model, crit, cfg.lr, cfg.trunk_lr_mult, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    sched = build_scheduler(opt, cfg.step_size, cfg.gamma)
    logs = []
    tr = Trainer(model, crit, opt, sched, device="cpu", loader_generator=gen, checkpoint_dir=ckdir, config=cfg,
                 progress=False, log=logs.append, **kw)
    return tr, loader, logs


def _set_lr(tr: Trainer, value: float) -> None:
    for g in tr.optimizer.param_groups:
        g["lr"] = value


def _finite_state(path: str) -> bool:
    ck = load_checkpoint(path)
    tensors = list(ck["model"].values()) + list(ck["criterion"].values())
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def test_nan_learning_rate_stops_within_a_few_steps_and_keeps_the_checkpoint(records, tmp_path):
    """lr = NaN: the first step makes every weight NaN, so the next losses are NaN; training stops after
    MAX_BAD_STEPS such batches with the epoch and step, and the epoch-1 checkpoint stays as it was."""
    tr, loader, logs = _trainer(records, str(tmp_path))
    assert len(loader) == 6 and MAX_BAD_STEPS == 3
    tr.fit(loader, 1)
    before = open(tr.checkpoint_path, "rb").read()
    _set_lr(tr, math.nan)
    with pytest.raises(TrainingDiverged) as err:
        tr.fit(loader, 2)
    msg = str(err.value)
    assert "\n" not in msg
    assert "epoch 2" in msg and f"step {1 + MAX_BAD_STEPS}" in msg, msg
    assert "not finite" in msg and "learning rate" in msg
    assert err.value.epoch == 2 and err.value.step == 1 + MAX_BAD_STEPS
    assert tr.epoch == 1 and len(logs) == 1  # no "epoch 2: loss ..." line was written
    assert open(tr.checkpoint_path, "rb").read() == before
    assert _finite_state(tr.checkpoint_path)


def test_non_finite_weights_at_the_end_of_an_epoch_are_not_saved(records, tmp_path):
    """Fewer bad batches than the limit before the epoch ends: the state check before saving stops it."""
    tr, loader, _ = _trainer(records, str(tmp_path), batch_size=8)  # 3 batches per epoch
    tr.fit(loader, 1)
    before = open(tr.checkpoint_path, "rb").read()
    _set_lr(tr, math.nan)
    with pytest.raises(TrainingDiverged, match=r"epoch 2\b.*not finite.*checkpoint") as err:
        tr.fit(loader, 2)
    assert err.value.epoch == 2 and tr.epoch == 1
    assert open(tr.checkpoint_path, "rb").read() == before
    # a direct save of a poisoned state is refused too
    with torch.no_grad():
        next(tr.model.parameters()).fill_(math.inf)
    with pytest.raises(TrainingDiverged, match="not finite"):
        tr.save()
    assert open(tr.checkpoint_path, "rb").read() == before


class _FlakyLoss(nn.Module):
    """Wraps a criterion; the loss of the listed calls (0-based) is NaN for every sample."""

    def __init__(self, inner: nn.Module, bad_calls) -> None:
        super().__init__()
        self.inner = inner
        self.bad_calls = set(bad_calls)
        self.calls = 0

    def forward(self, feature, target):
        loss, acc = self.inner(feature, target)
        if self.calls in self.bad_calls:
            loss = loss * math.nan
        self.calls += 1
        return loss, acc


def test_isolated_bad_batches_are_skipped_and_counted(records):
    """Fewer than MAX_BAD_STEPS consecutive bad batches: skipped (no step), counted, training goes on."""
    tr, loader, logs = _trainer(records, criterion_wrapper=lambda c: _FlakyLoss(c, {1, 2, 4}))
    (stats,) = tr.fit(loader, 1)
    assert stats["skipped_batches"] == 3 and math.isfinite(stats["loss"])
    assert "3 of 6 batches skipped" in logs[0]
    tr2, loader2, _ = _trainer(records, criterion_wrapper=lambda c: _FlakyLoss(c, {1, 2, 3}))
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 4 .*3 consecutive"):
        tr2.fit(loader2, 1)


def test_bad_step_limit_is_an_option(records):
    tr, loader, _ = _trainer(records, criterion_wrapper=lambda c: _FlakyLoss(c, {0}), max_bad_steps=1)
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 1\b"):
        tr.fit(loader, 1)
    with pytest.raises(ValueError, match="max_bad_steps"):
        _trainer(records, max_bad_steps=0)


# ----------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------

def test_checkpoint_gets_the_usual_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint({"epoch": 1}, str(tmp_path / "checkpoint.pt"))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        os.umask(0o077)
        save_checkpoint({"epoch": 2}, path)  # a replacing save follows the umask in force
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        os.umask(old)


def test_stale_temporary_files_of_a_killed_save_are_removed(tmp_path):
    """A process killed inside torch.save leaves its hidden temporary file; the next save removes it
    (and only files of that pattern for that checkpoint)."""
    path = tmp_path / "checkpoint.pt"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        import torch
        from qaconv_ext.engine import checkpoint as ck
        def killed(obj, fh, *a, **kw):
            fh.write(b"PK partial")
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        ck.torch.save = killed
        ck.save_checkpoint({{"epoch": 1}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    stale = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].startswith(".checkpoint.pt.")
    keep = [".baseline.pt.abcd1234.tmp", "notes.tmp", ".checkpoint.pt.tmp", "checkpoint.pt.abcd1234.tmp"]
    for name in keep:
        (tmp_path / name).write_bytes(b"not ours")
    save_checkpoint({"epoch": 2}, str(path))
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["checkpoint.pt"])
    assert load_checkpoint(str(path))["epoch"] == 2
