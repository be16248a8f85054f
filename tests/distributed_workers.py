"""Code that runs inside the worker processes of the multi-process tests (gloo on the CPU).

Each worker joins a process group through the environment variables torchrun would set, does its
part and saves what it saw under ``out`` for the parent test to compare with one process.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (for the process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, world: int, port: int, timeout_s: float, fn: Callable, args: Sequence[Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    torch.set_num_threads(1)
    from qaconv_ext.distributed import init_from_env, shutdown

    env = init_from_env("cpu", timeout_s=timeout_s)
    try:
        fn(env, *args)
    finally:
        shutdown()


def spawn(fn: Callable, world: int, *args: Any, timeout_s: float = 60.0) -> None:
    """Run ``fn(env, *args)`` in ``world`` processes joined by a gloo process group.

    The processes are forked (started in a fraction of a second, the parent's imports inherited);
    they limit themselves to one thread each.
    """
    mp.start_processes(_entry, args=(world, free_port(), timeout_s, fn, args), nprocs=world, join=True,
                       start_method="fork")


def maps(seed: int, n: int, d: int = 8, h: int = 4, w: int = 3) -> torch.Tensor:
    """Random unit feature maps; 4 x 3 locations unless told."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, h, w, generator=g), dim=1)


def head(layout: str, seed: int = 3, hw=(4, 3)):
    from qaconv_ext.head import QAConv

    torch.manual_seed(seed)
    h = QAConv(8, *hw, layout=layout)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in h.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return h.eval()


def score_worker(env, out: str, layout: str, P: int, N: int) -> None:
    """Sharded query-gallery and self scores, plus the row gathers, saved by rank 0."""
    from qaconv_ext.distributed import (all_gather_rows, gather_rows, shard_range, sharded_score_blocks,
                                        sharded_self_score_blocks)

    q, g = maps(1, P), maps(2, N)
    part = shard_range(N, env.rank, env.world_size)
    h = head(layout)
    qg = sharded_score_blocks(h, q, g[part.start:part.stop], query_chunk=3, gallery_chunk=2, progress=False)
    gg = sharded_self_score_blocks(h, g, chunk=3, progress=False)
    rows = torch.arange(len(part) * 2, dtype=torch.float32).view(-1, 2) + 100 * env.rank
    gathered = gather_rows(rows)
    everywhere = all_gather_rows(rows)
    # 3 x 2 locations: the last bit may depend on the pair's place in the call (the parent checks closeness)
    q6, g6 = maps(3, P, h=3, w=2), maps(4, 2 * N - 1, h=3, w=2)
    part6 = shard_range(len(g6), env.rank, env.world_size)
    qg6 = sharded_score_blocks(head(layout, hw=(3, 2)), q6, g6[part6.start:part6.stop], progress=False)
    from qaconv_ext.distributed import sharded_topk

    gt = tie_gallery(g)
    top = {k: sharded_topk(h, q, gt[part.start:part.stop], k, progress=False) for k in (1, 4, 7, 20)}
    torch.save({"everywhere": everywhere}, Path(out) / f"rank{env.rank}.pt")
    if env.rank == 0:
        torch.save({"qg": qg, "gg": gg, "gathered": gathered, "qg6": qg6, "start6": part6.stop, "top": top},
                   Path(out) / "result.pt")
    else:
        assert qg is None and gg is None and gathered is None and qg6 is None
        assert all(t is None for t in top.values())


def tie_gallery(g: torch.Tensor) -> torch.Tensor:
    """``g`` with image 8 a copy of image 2 (equal scores on two ranks: ties across shards)."""
    g = g.clone()
    g[8] = g[2]
    return g


def options_worker(env, out: str) -> None:
    """Rank 1 was given another dataset: every rank must stop with one line naming it."""
    from qaconv_ext.distributed import check_same_options

    opts = {"dataset": "market1501" if env.rank == 0 else "duke", "checkpoint": "ck.pt"}
    try:
        check_same_options(opts, "qaconv eval")
    except SystemExit as e:
        (Path(out) / f"rank{env.rank}.txt").write_text(str(e))
        return
    raise AssertionError("the mismatch went unnoticed")


def dead_rank_worker(env, out: str) -> None:
    """Rank 1 leaves without taking part; rank 0's gather must fail with a clear error, not hang."""
    from qaconv_ext.distributed import RankFailure, all_gather_rows

    if env.rank == 1:
        os._exit(0)  # dies without a word (no shutdown of the group)
    t0 = time.perf_counter()
    try:
        all_gather_rows(torch.zeros(2, 3))
    except RankFailure as e:
        (Path(out) / "error.txt").write_text(f"{time.perf_counter() - t0:.3f}\n{e}")
        os._exit(0)  # the group's other end is gone: leave without tearing it down
    raise AssertionError("the gather returned although rank 1 is dead")


def stuck_rank_worker(env, out: str, sleep_s: float) -> None:
    """Rank 1 is alive but never joins the gather; rank 0 must give up after the group's timeout."""
    from qaconv_ext.distributed import RankFailure, all_gather_rows

    if env.rank == 1:
        time.sleep(sleep_s)
        os._exit(0)
    t0 = time.perf_counter()
    try:
        all_gather_rows(torch.zeros(2, 3))
    except RankFailure as e:
        (Path(out) / "error.txt").write_text(f"{time.perf_counter() - t0:.3f}\n{e}")
        os._exit(0)
    raise AssertionError("the gather returned although rank 1 never joined")


def cli_worker(env, out: str, argvs: Sequence[Sequence[str]]) -> None:
    """``qaconv`` with ``argvs[rank]`` on each rank; each rank's exit status (or exit message) and stdout saved."""
    import contextlib
    import io

    from qaconv_ext import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            rc = cli.main(list(argvs[env.rank]))
        except SystemExit as e:   # a command's one-line error: its message; else the status
            rc = str(e) or str(e.code)
    (Path(out) / f"rank{env.rank}.out").write_text(f"{rc}\n{buf.getvalue()}")


def training_setup(seed: int = 5, n: int = 64, classes: int = 6):
    """A small QAConv model, its optimiser and a fixed set of images and labels (no augmentation)."""
    from qaconv_ext.engine import TrainConfig
    from qaconv_ext.engine.trainer import build_model, build_optimizer

    cfg = TrainConfig(arch="small", neck=8, height=32, width=16, batch_size=32, lr=0.05)
    torch.manual_seed(seed)
    backbone, criterion = build_model(cfg, classes)
    optimizer = build_optimizer(backbone, criterion, cfg.lr, 1.0)
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(n, 3, 32, 16, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return backbone, criterion, optimizer, images, labels


def train_steps(rank: int, world: int, dist_hook=None, epochs: int = 1):
    """Train the :func:`training_setup` model ``epochs`` epochs of batch 32 (``32 / world`` per rank)."""
    from qaconv_ext.distributed import ShardedBatchSampler
    from qaconv_ext.engine import Trainer

    backbone, criterion, optimizer, images, labels = training_setup()
    sampler = ShardedBatchSampler(len(images), 32, rank, world, torch.Generator().manual_seed(0))
    trainer = Trainer(backbone, criterion, optimizer, device="cpu", progress=False, log=lambda s: None,
                      dist=dist_hook)
    for e in range(epochs):
        loader = [(images[idx], labels[idx]) for idx in sampler]
        trainer.history.append(trainer.train_epoch(loader, e, epochs))
    return trainer


def training_worker(env, out: str, sync_bn: bool, runs) -> None:
    """2 ranks x batch 16 with the gathered batch, for each ``(dtype name, epochs)`` of ``runs``; each rank
    saves its model, criterion and history per run."""
    from qaconv_ext.distributed import DistributedTraining

    hook = DistributedTraining(env, sync_bn=sync_bn)
    for dtype, epochs in runs:
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            trainer = train_steps(env.rank, env.world_size, hook, epochs=epochs)
        finally:
            torch.set_default_dtype(torch.float32)
        torch.save({"model": trainer.model.state_dict(), "criterion": trainer.criterion.state_dict(),
                    "loss": [h["loss"] for h in trainer.history], "acc": [h["acc"] for h in trainer.history]},
                   Path(out) / f"train_{dtype}_{env.rank}.pt")


def sparse_cli_worker(env, out: str, argv: Sequence[str]) -> None:
    """``qaconv`` with ``argv`` while every gallery-gallery matrix the sharded evaluation asks for is
    recorded (its size, per rank); then as :func:`cli_worker`."""
    import json

    import qaconv_ext.distributed.evaluation as dist_eval

    sizes = []
    real = dist_eval.sharded_self_score_blocks

    def recording(head, fea, *args, **kwargs):
        sizes.append(int(fea.shape[0]))
        return real(head, fea, *args, **kwargs)

    dist_eval.sharded_self_score_blocks = recording
    try:
        cli_worker(env, out, [argv] * env.world_size)
    finally:
        dist_eval.sharded_self_score_blocks = real
    (Path(out) / f"matrices{env.rank}.json").write_text(json.dumps(sizes))


def pair_count_worker(env, out: str, n: int, chunk: int, layout: str) -> None:
    """``sharded_self_score_blocks`` of ``n`` small maps, counting the pairs this rank scores."""
    import json

    import qaconv_ext.ops
    import qaconv_ext.scoring
    from qaconv_ext.distributed import sharded_self_score_blocks

    counted = [0]
    real = qaconv_ext.ops.qaconv_score

    def counting(q, g, *args, **kwargs):
        counted[0] += q.shape[0] * g.shape[0]
        return real(q, g, *args, **kwargs)

    patched = [m for m in (qaconv_ext.ops, qaconv_ext.scoring) if getattr(m, "qaconv_score", None) is real]
    for m in patched:
        m.qaconv_score = counting
    try:
        fea = maps(11, n, d=4, h=2, w=2)
        full = sharded_self_score_blocks(_small_head(layout), fea, chunk=chunk, progress=False)
    finally:
        for m in patched:
            m.qaconv_score = real
    (Path(out) / f"pairs{env.rank}.json").write_text(json.dumps(counted[0]))
    if env.rank == 0:
        torch.save(full, Path(out) / "full.pt")


def _small_head(layout: str):
    from qaconv_ext.head import QAConv

    torch.manual_seed(4)
    return QAConv(4, 2, 2, layout=layout).eval()
