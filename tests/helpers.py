"""Helpers shared by the test modules: inputs, error measures, device parameters, seeds."""
from __future__ import annotations

import os
import zlib
from typing import Callable, Dict, Iterable, List, Tuple

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")

# The devices the op contract is tested on: the CPU always, CUDA when a device is present.
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def device_dtypes(dtypes: Iterable[torch.dtype]) -> List:
    """``(device, dtype)`` parameters: every dtype on the CPU, all but float64 (CPU-only) on CUDA."""
    params = []
    for device in ("cpu", "cuda"):
        for dtype in dtypes:
            if device == "cuda" and dtype == torch.float64:
                continue
            params.append(pytest.param(device, dtype, marks=[NEEDS_CUDA] if device == "cuda" else [],
                                       id=f"{device}-{dtype_id(dtype)}"))
    return params


def seed_of(text: str) -> int:
    """A stable 32-bit seed derived from ``text`` (a test's id with its parameters)."""
    return zlib.crc32(text.encode("utf-8"))


def unit_maps(batch: int, channels: int, height: int, width: int, dtype=torch.float32,
              generator: torch.Generator | None = None, device: str = "cpu") -> torch.Tensor:
    """Random feature maps, L2-normalised over channels at every location (as QAConv feeds them).

    Drawn on the CPU from ``generator``, so a seed gives the same maps on every device.
    """
    x = torch.randn(batch, channels, height, width, dtype=torch.float64, generator=generator)
    x = torch.nn.functional.normalize(x, dim=1)
    return x.to(device=device, dtype=dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (on the CPU, so the two may live on different devices)."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def score_err(out: torch.Tensor, query: torch.Tensor, gallery: torch.Tensor, weight: torch.Tensor,
              bias=None) -> float:
    """Error of ``qaconv_score`` output against the float64 reference, relative to ``||values| @ |w|||``.

    A signed weighted sum can cancel, so a plain relative error fails on lucky cancellations; the sum
    of the terms' magnitudes is the scale that rounding errors grow with.
    """
    from qaconv_ext import reference

    dev = query.device  # the float64 reference runs where the inputs are (fast on a GPU)
    q, g = query.detach().double(), gallery.detach().double()
    w = weight.detach().to(dev, torch.float64).reshape(-1)
    b = bias.to(dev, torch.float64) if isinstance(bias, torch.Tensor) else bias
    ref = reference.qaconv_score(q, g, w, b)
    scale = reference.qaconv_match(q, g).abs() @ w.abs()
    return float((out.to(dev, torch.float64) - ref).norm() / scale.norm().clamp_min(1e-300))


def bad_op_calls(device: str) -> Dict[str, Callable[[], object]]:
    """Invalid calls of the dispatcher ops on ``device``, by the rule each one breaks.

    The compiled kernels, the fake kernels (``device="meta"``) and the pure-PyTorch fallback must
    answer each with the same error type and message.
    """
    ops = torch.ops.qaconv_ext

    def t(*shape, dtype=torch.float32):
        return torch.zeros(shape, dtype=dtype, device=device)

    q, g, w = t(2, 8, 3, 3), t(3, 8, 3, 3), t(18)
    grad, idx = t(2, 3, 18), torch.zeros(2, 3, 18, dtype=torch.long, device=device)
    return {
        "query rank": lambda: ops.match(q[0], g, False),
        "gallery rank": lambda: ops.match(q, g[:, :, 0], True),
        "dtypes differ": lambda: ops.match(q, g.double(), False),
        "unsupported dtype": lambda: ops.match(q.int(), g.int(), False),
        "channel mismatch": lambda: ops.match(q, t(3, 7, 3, 3), False),
        "no channels": lambda: ops.score(t(2, 0, 3, 3), t(3, 0, 3, 3), w, None),
        "empty query": lambda: ops.match(t(2, 8, 0, 3), g, False),
        "empty gallery": lambda: ops.match(q, t(3, 8, 3, 0), False),
        "weight dtype": lambda: ops.score(q, g, w.long(), None),
        "weight length": lambda: ops.score(q, g, t(17), None),
        "weight shape": lambda: ops.score(q, g, t(2, 9), None),
        "bias size": lambda: ops.score(q, g, w, t(2)),
        "grad_values shape": lambda: ops.match_backward(t(2, 3, 17), idx, q, g),
        "indices shape": lambda: ops.match_backward(grad, idx[:, :2], q, g),
        "indices dtype": lambda: ops.match_backward(grad, idx.int(), q, g),
        "backward pair": lambda: ops.match_backward(grad, idx, q, t(3, 7, 3, 3)),
    }


def error_of(call: Callable[[], object]):
    """``(type name, message)`` of the exception ``call`` raises, or ``None`` when it returns."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001  (the type itself is what is compared)
        return type(exc).__name__, str(exc).split("\n")[0]
    return None


def centroid_problem(seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small centroid-score problem: table float32 [2, 9, 70], uint16 codes [5, 11], weight [81]
    (70 query locations: a 64-wide block and a tail; 11 gallery locations: an 8-wide step and a tail)."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(2, 9, 70, generator=gen)
    codes = torch.randint(0, 9, (5, 11), generator=gen).to(torch.uint16)
    return table, codes, torch.rand(81, generator=gen)


def uneven_head(d: int, h: int, w: int, seed: int = 0):
    """An eval-mode QAConv head for ``d x h x w`` maps whose FC weights are positive and uneven (drawn
    with ``seed``), so that a map's best match is itself, and with non-trivial BN statistics."""
    from qaconv_ext import QAConv

    torch.manual_seed(seed)
    head = QAConv(d, h, w)
    with torch.no_grad():
        head.fc.weight.uniform_(0.5, 1.5)
        head.bn.running_mean.fill_(0.1)
        head.bn.running_var.fill_(2.0)
    return head.eval()


def put_market_image(top, sub: str, pid: int, cam: int, frame: int, color, rng, *, noise: float,
                     size: Tuple[int, int], k: int = 0) -> None:
    """One Market-1501-named JPEG in ``top/sub``: ``color`` plus Gaussian noise drawn from ``rng``."""
    import numpy as np
    from PIL import Image

    folder = top / sub
    folder.mkdir(parents=True, exist_ok=True)
    img = np.clip(color + rng.normal(0, noise, size=(size[0], size[1], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(folder / f"{pid:04d}_c{cam}s1_{frame:06d}_{k:02d}.jpg")


def write_tiny_market(top, *, seed: int, train_ids: Iterable[int], test_ids: Iterable[int], noise: float = 20.0,
                      size: Tuple[int, int] = (32, 16), train: bool = True, distractor: bool = False):
    """A tiny Market-1501 tree in the folder ``top``: 4 training images per ``train_ids`` identity on
    cameras 1/2 (unless not ``train``), one query (camera 1) and two gallery images (camera 2) per
    ``test_ids`` identity, and with ``distractor`` one pid-0 gallery image. Each identity is a random
    colour plus noise, drawn from ``numpy.random.default_rng(seed)`` in a fixed order. Returns ``top``."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def put(sub, pid, cam, frame, k, color):
        put_market_image(top, sub, pid, cam, frame, color, rng, noise=noise, size=size, k=k)

    for pid in train_ids:
        color = rng.integers(0, 255, size=3)
        for k in range(4):
            if train:
                put("bounding_box_train", pid, k % 2 + 1, 100 * pid + k, k, color)
    for pid in test_ids:
        color = rng.integers(0, 255, size=3)
        put("query", pid, 1, 50 * pid, 0, color)
        for k in range(2):
            put("bounding_box_test", pid, 2, 50 * pid + 25 + k, k, color)
    if distractor:
        put("bounding_box_test", 0, 1, 7, 0, rng.integers(0, 255, size=3))
    return top


def write_train_records(root, *, seed: int, size: Tuple[int, int], time_of: Callable[[int, int], float]) -> List:
    """24 small JPEGs in ``root``, 6 identities x 4 images on two cameras, as training ``Record``s.
    Identity ``pid`` is a random colour plus noise (``numpy.random.default_rng(seed)``); image ``k`` of it
    is on camera ``k % 2`` at time ``time_of(pid, k)``."""
    import numpy as np
    from PIL import Image

    from qaconv_ext.data import Record

    rng = np.random.default_rng(seed)
    records = []
    for pid in range(6):
        base = rng.integers(0, 255, size=3)
        for k in range(4):
            img = np.clip(base + rng.normal(0, 25, size=(size[0], size[1], 3)), 0, 255).astype(np.uint8)
            path = os.path.join(root, f"{pid:04d}_c{k % 2 + 1}_{k}.jpg")
            Image.fromarray(img).save(path)
            records.append(Record(path, pid, k % 2, float(time_of(pid, k))))
    return records


def put_market_views(data, pids: Iterable[int], views, *, seed: int, noise: float, size: Tuple[int, int]) -> None:
    """For every identity of ``pids`` (a random colour each), one Market-1501-named image per
    ``(subfolder, camera)`` of ``views``, the k-th view at frame ``100 * pid + k``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for pid in pids:
        color = rng.integers(0, 255, size=3)
        for k, (sub, cam) in enumerate(views):
            put_market_image(data, sub, pid, cam, 100 * pid + k, color, rng, noise=noise, size=size)


def fails(argv, capsys, code: int = 2) -> str:
    """Run ``qaconv argv``; it must end with status ``code`` and one line on stderr, ``qaconv <command>: ...``.
    Returns that line."""
    from qaconv_ext import cli

    argv = [str(a) for a in argv]
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == code, (err.value.code, str(err.value))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0] == str(err.value) and lines[0].startswith(f"qaconv {argv[0]}: "), lines[0]
    return lines[0]


def save_tiny_checkpoint(path, seed: int, *, neck: int = 8, height: int = 32, width: int = 16) -> str:
    """An untrained QAConv checkpoint of the small backbone (``neck`` channels, ``height x width`` images,
    seeded with ``seed``) at ``path``, written as training writes it; returns the path."""
    from qaconv_ext import QAConv
    from qaconv_ext.models import build_backbone

    torch.manual_seed(seed)
    backbone = build_backbone("small", neck=neck).eval()
    head = QAConv(neck, height // 8, width // 8).eval()
    torch.save({"format": "qaconv-ext/1", "model": backbone.state_dict(), "head": head.state_dict(),
                "config": {"method": "qaconv", "arch": "small", "neck": neck, "height": height, "width": width}},
               path)
    return str(path)


#: The benchmark scripts' folder (they import their shared helpers as ``_machine``).
BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def pair_order(maps: torch.Tensor) -> torch.Tensor:
    """float32 maps in the channel order of the CPU bfloat16 kernel's chain: 1, 0, 3, 2, ... (a zero channel
    after an odd last one). With no denormal on the way, the float32 kernel on these maps gives the bits of
    the bfloat16 kernel on the original ones."""
    m = maps.float()
    if m.shape[1] % 2:
        m = torch.cat([m, torch.zeros_like(m[:, :1])], dim=1)
    return m.unflatten(1, (-1, 2)).flip(2).flatten(1, 2)
