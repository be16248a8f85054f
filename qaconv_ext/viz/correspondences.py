"""Pictures of QAConv's local correspondences (Fig. 2 of the paper), drawn with Pillow.

For an image pair (a, b), :func:`qaconv_ext.qaconv_match` gives, for every location of ``a``, the
best-matching location of ``b`` (and the reverse) with the similarity of that match. A location index
``i`` of an ``h x w`` map sits at row ``i // w`` and column ``i % w``; its centre in image pixels is
``((col + 0.5) * stride_x, (row + 0.5) * stride_y)``. Each match becomes a line between the two
centres. With the QAConv head, a line's strength is the location's *contribution* to the pair's
score: the head's eval-mode first BatchNorm applied to the max similarity, times the FC weight of that
location's slot (the head computes them: :meth:`qaconv_ext.QAConv.contributions`). Lines can be
thresholded on that strength, capped to the strongest ``max_lines`` and coloured by it.

Absolute contributions are often largest where every pair matches well -- background, the image
border. Given ``reference`` values (the query matched against a set of gallery images, e.g. the whole
gallery), the strength is the contribution *above the reference average* instead:
``fc_weight[slot] * (BN(v) - BN(mean v_ref))``. These sum to the pair's logit minus the logit of the
average match (before the final BatchNorm's scale), so the lines show what sets this pair apart.

Two levels:

* :func:`draw_correspondences` takes two images and their feature maps (and optionally the head),
  runs the matching op and draws.
* :func:`draw_matches` takes precomputed ``(values, indices)`` of one pair, e.g. a slice of a
  batched ``qaconv_match(q, g, return_indices=True)`` call.

Both return a ``PIL.Image`` (and with ``return_segments=True`` the list of :class:`Segment` drawn,
strongest first).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data import read_image
from ..head import QAConv
from ..ops import qaconv_match

__all__ = [
    "Segment",
    "load_image",
    "infer_stride",
    "location_centers",
    "head_contributions",
    "relative_contributions",
    "head_logit",
    "match_pair",
    "average_match",
    "correspondence_segments",
    "draw_matches",
    "draw_correspondences",
    "strength_colormap",
]

PathLike = Union[str, "os.PathLike[str]"]
ImageInput = Union[PathLike, "PIL.Image.Image", np.ndarray, Any]  # noqa: F821 - PIL imported lazily
Color = Tuple[int, int, int]
StrideArg = Optional[Union[float, Tuple[float, float]]]

#: A picture, or ``(picture, segments)`` with ``return_segments=True``.
DrawResult = Union["PIL.Image.Image", Tuple["PIL.Image.Image", List["Segment"]]]  # noqa: F821

DIRECTIONS = ("both", "a_to_b", "b_to_a")

# Blue (weak) -> yellow -> red (strong); a diverging palette that reads on light and dark images.
_ANCHORS = np.array([
    (49, 54, 149), (69, 117, 180), (116, 173, 209), (171, 217, 233),
    (254, 224, 144), (253, 174, 97), (244, 109, 67), (215, 48, 39),
], dtype=np.float64)


@dataclass(frozen=True)
class Segment:
    """One drawn correspondence line.

    ``direction`` is ``"a_to_b"`` (a location of image a and its best match in b) or ``"b_to_a"``;
    ``loc_a``/``loc_b`` are location indices in the two feature maps; ``xy_a``/``xy_b`` the line's
    end points in pixels of the returned picture; ``value`` the max similarity of the match;
    ``strength`` what thresholds, ranks and colours the line (the head contribution when a head or
    explicit strengths were given, else ``value``); ``color`` its RGB colour.
    """

    direction: str
    loc_a: int
    loc_b: int
    xy_a: Tuple[float, float]
    xy_b: Tuple[float, float]
    value: float
    strength: float
    color: Color = (255, 0, 0)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def load_image(image: ImageInput, name: str = "image") -> "PIL.Image.Image":  # noqa: F821
    """An RGB ``PIL.Image`` from a path, a PIL image, an ``H x W x 3`` uint8 array or a record.

    Objects with a ``path`` attribute (e.g. :class:`qaconv_ext.data.Record`) are read from that path.
    A missing or unreadable file raises :class:`qaconv_ext.data.ImageReadError` naming the path.
    """
    from PIL import Image

    if hasattr(image, "path") and not isinstance(image, (str, bytes)) and not hasattr(image, "size"):
        image = image.path
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image))
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = np.transpose(arr, (1, 2, 0))  # CHW -> HWC
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
            raise ValueError(f"{name}: expected an H x W x 3 array, got shape {tuple(image.shape)}")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        if arr.dtype != np.uint8:
            if arr.dtype.kind == "f" and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
                arr = np.round(arr * 255.0)
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    raise TypeError(f"{name}: expected an image path, a PIL image or an array, got {type(image).__name__}")


def _feature_map(fea: Any, name: str) -> torch.Tensor:
    if not isinstance(fea, torch.Tensor):
        fea = torch.as_tensor(np.asarray(fea))
    if fea.dim() == 4:
        if fea.shape[0] != 1:
            raise ValueError(f"{name}: expected one feature map [d, h, w] or [1, d, h, w], "
                             f"got a batch of {fea.shape[0]} (shape {tuple(fea.shape)}); pick one with {name}[i]")
        fea = fea[0]
    if fea.dim() != 3:
        raise ValueError(f"{name}: expected a feature map [d, h, w] or [1, d, h, w], got shape {tuple(fea.shape)}")
    if min(fea.shape) == 0:
        raise ValueError(f"{name}: empty feature map, shape {tuple(fea.shape)}")
    if not fea.is_floating_point():
        fea = fea.float()
    return fea.detach()


def _size_hw(size: Sequence[int], name: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected (height, width), got {size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name}: sizes must be positive, got {(h, w)}")
    return h, w


def infer_stride(image_size: Tuple[int, int], feature_size: Tuple[int, int], stride: StrideArg = None,
                 name: str = "image") -> Tuple[float, float]:
    """The ``(stride_y, stride_x)`` mapping feature locations to pixels, checked against the sizes.

    ``image_size`` is ``(H, W)`` in pixels, ``feature_size`` ``(h, w)``. With ``stride=None`` the
    stride is ``H / h`` and ``W / w``, which must agree within 10 % (else the feature map does not
    belong to an image of that shape: resize the image to the network's input size) and be >= 1.
    An explicit stride (a number or ``(sy, sx)``) must put the ``h x w`` grid on the image:
    ``|h * sy - H| < sy`` (ceil or floor convolution arithmetic) and the same for ``w``.
    Raises ``ValueError`` naming the sizes otherwise.
    """
    H, W = _size_hw(image_size, f"{name} size")
    h, w = _size_hw(feature_size, f"{name} feature size")
    if stride is None:
        sy, sx = H / h, W / w
        if sy < 1.0 or sx < 1.0:
            raise ValueError(
                f"{name} is {W}x{H} pixels (W x H) but its feature map is {w}x{h} (w x h): the feature "
                f"map is larger than the image; did you pass the right image, or swap the feature axes?")
        if abs(sy - sx) > 0.1 * max(sy, sx):
            raise ValueError(
                f"{name} is {W}x{H} pixels (W x H) but its feature map is {w}x{h} (w x h): the strides "
                f"differ ({sy:.3g} vertically, {sx:.3g} horizontally), so the map does not fit the image. "
                f"Pass image_size=(H, W) with the network's input size (the image is resized for drawing), "
                f"or an explicit stride=(sy, sx).")
        return sy, sx
    if isinstance(stride, (tuple, list)):
        if len(stride) != 2:
            raise ValueError(f"stride: expected a number or (stride_y, stride_x), got {stride!r}")
        sy, sx = float(stride[0]), float(stride[1])
    else:
        sy = sx = float(stride)
    if not (sy > 0 and sx > 0 and math.isfinite(sy) and math.isfinite(sx)):
        raise ValueError(f"stride: must be positive and finite, got {stride!r}")
    if abs(h * sy - H) >= sy or abs(w * sx - W) >= sx:
        raise ValueError(
            f"{name} is {W}x{H} pixels (W x H) but its feature map is {w}x{h} (w x h) and stride "
            f"({sy:g}, {sx:g}) maps it onto {w * sx:g}x{h * sy:g} pixels: image and feature sizes are inconsistent")
    return sy, sx


def location_centers(indices: Union[torch.Tensor, np.ndarray, Sequence[int]], width: int,
                     stride: Tuple[float, float], offset: Tuple[float, float] = (0.0, 0.0),
                     scale: float = 1.0) -> np.ndarray:
    """Pixel centres ``[n, 2]`` (x, y) of location indices on a map ``width`` locations wide.

    ``(row, col) = (idx // width, idx % width)``; ``x = offset_x + (col + 0.5) * stride_x * scale``
    and ``y = offset_y + (row + 0.5) * stride_y * scale``.
    """
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).reshape(-1)
    row, col = idx // int(width), idx % int(width)
    sy, sx = stride
    x = offset[0] + (col + 0.5) * sx * scale
    y = offset[1] + (row + 0.5) * sy * scale
    return np.stack([x, y], axis=1).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Head contributions
# ----------------------------------------------------------------------------------------------

def _qaconv_head(head: Any) -> QAConv:
    """``head`` itself when it is a :class:`qaconv_ext.QAConv`; ``TypeError`` otherwise."""
    if not isinstance(head, QAConv):
        raise TypeError(f"head: expected a qaconv_ext.QAConv, got {type(head).__name__} (build one from a state "
                        f"dict with QAConv.from_state_dict)")
    return head


def _float64_cpu(values: Any) -> torch.Tensor:
    return torch.as_tensor(values).detach().double().cpu()


def head_contributions(values: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """Each max value's contribution to the pair's score: ``fc_weight[slot] * BN(value)``.

    ``values`` is ``[..., Lq + Lg]`` in :func:`qaconv_ext.qaconv_match`'s order; the result has the same
    shape (float64, CPU, no gradient). BN is the head's first BatchNorm in eval mode, whatever the
    head's mode. Summed, plus the FC bias (twice for the shared-FC "v2" layout), they give the head's
    output before its final BatchNorm (see :func:`head_logit`). :meth:`qaconv_ext.QAConv.contributions`
    computes them; ``head`` is a :class:`qaconv_ext.QAConv` of either layout.
    """
    with torch.no_grad():
        return _qaconv_head(head).contributions(_float64_cpu(values))


def relative_contributions(values: torch.Tensor, reference: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """:func:`head_contributions` of ``values [..., Lq + Lg]`` minus those of the mean of ``reference``.

    ``reference`` is ``[Lq + Lg]`` or ``[M, Lq + Lg]`` (averaged over its rows): the max values of the
    same query against reference gallery images. The result sums to the pair's pre-BatchNorm logit
    minus that of the average reference match; positive entries are what this pair matches better.
    """
    ref = _float64_cpu(reference)
    if ref.dim() == 2:
        ref = ref.mean(dim=0)
    v = _float64_cpu(values)
    if ref.dim() != 1 or ref.shape[0] != v.shape[-1]:
        raise ValueError(f"reference: expected [{v.shape[-1]}] or [M, {v.shape[-1]}] max values (the query against "
                         f"reference gallery images), got shape {tuple(torch.as_tensor(reference).shape)}")
    return head_contributions(v, head) - head_contributions(ref, head)


def head_logit(values: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """The head's eval-mode output (logit) from the max values ``[..., Lq + Lg]`` -> ``[...]`` (float64):
    :meth:`qaconv_ext.QAConv.logit`."""
    with torch.no_grad():
        return _qaconv_head(head).logit(_float64_cpu(values))


def match_pair(fea_a: torch.Tensor, fea_b: torch.Tensor, normalize: bool = True
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Match one pair of feature maps: ``(values, indices)``, each ``[La + Lb]`` on the CPU.

    ``fea_a`` plays the query, ``fea_b`` the gallery. With ``normalize`` the maps are L2-normalised
    over channels first (what QAConv feeds; a no-op on a backbone's normalised output).
    """

    a = _feature_map(fea_a, "fea_a")
    b = _feature_map(fea_b, "fea_b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"fea_a and fea_b: channel counts differ ({a.shape[0]} vs {b.shape[0]})")
    if a.device != b.device:
        b = b.to(a.device)
    if a.dtype != b.dtype:
        b = b.to(a.dtype)
    if normalize:
        a = torch.nn.functional.normalize(a, dim=0)
        b = torch.nn.functional.normalize(b, dim=0)
    with torch.no_grad():
        values, indices = qaconv_match(a[None].contiguous(), b[None].contiguous(), return_indices=True)
    return values[0, 0].float().cpu(), indices[0, 0].cpu()


def average_match(query_fea: torch.Tensor, gallery_fea: torch.Tensor) -> torch.Tensor:
    """The mean over ``gallery_fea [N, d, h, w]`` of one query's max values ``[Lq + Lg]`` (CPU, float32):
    the ``reference`` of :func:`relative_contributions` and :func:`draw_correspondences`."""

    q = _feature_map(query_fea, "query_fea")[None]
    with torch.no_grad():
        return qaconv_match(q, gallery_fea.to(q.device))[0].float().mean(dim=0).cpu()


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------

def _one_pair_array(x: Any, name: str) -> np.ndarray:
    """``x`` (one pair's ``[La + Lb]`` or ``[1, 1, La + Lb]`` entries) as a 1-D NumPy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.ndim > 1:
        if any(s != 1 for s in arr.shape[:-1]):
            raise ValueError(f"{name}: expected the matches of one pair, [La + Lb] (or [1, 1, La + Lb]), "
                             f"got shape {arr.shape}; slice one pair, e.g. {name}[p, n]")
        arr = arr.reshape(-1)
    return arr


def strength_colormap(t: float) -> Color:
    """Colour for a normalised strength ``t`` in [0, 1]: blue (weak) through yellow to red (strong)."""
    t = min(max(float(t), 0.0), 1.0) if math.isfinite(float(t)) else 0.0
    pos = t * (len(_ANCHORS) - 1)
    i = min(int(pos), len(_ANCHORS) - 2)
    f = pos - i
    c = _ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f
    return tuple(int(round(v)) for v in c)  # type: ignore[return-value]


def correspondence_segments(values: Any, indices: Any, feature_size_a: Tuple[int, int],
                            feature_size_b: Tuple[int, int], *, strengths: Any = None,
                            direction: str = "both", threshold: Optional[float] = None,
                            max_lines: Optional[int] = 50, stride_a: Tuple[float, float] = (1.0, 1.0),
                            stride_b: Tuple[float, float] = (1.0, 1.0),
                            offset_a: Tuple[float, float] = (0.0, 0.0),
                            offset_b: Tuple[float, float] = (0.0, 0.0), scale: float = 1.0,
                            color: Optional[Color] = None,
                            colormap: Callable[[float], Color] = strength_colormap,
                            vmin: Optional[float] = None, vmax: Optional[float] = None) -> List[Segment]:
    """The lines to draw, strongest first, without drawing them.

    ``values``/``indices`` are one pair's ``[La + Lb]`` output of ``qaconv_match(a, b, return_indices=True)``
    (first ``La``: per location of a, the best location of b; next ``Lb``: the reverse).
    ``strengths`` (same length; default ``values``) decides what ``threshold`` (keep ``>= threshold``)
    and ``max_lines`` (keep the strongest) act on, and the colour: ``vmin..vmax`` (default: min..max
    of the kept lines; fix them to compare pictures) mapped through ``colormap``, unless a fixed
    ``color`` is given. NaN strengths are never drawn.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    if max_lines is not None and int(max_lines) < 0:
        raise ValueError(f"max_lines: must be >= 0 or None, got {max_lines}")
    ha, wa = _size_hw(feature_size_a, "feature_size_a")
    hb, wb = _size_hw(feature_size_b, "feature_size_b")
    la, lb = ha * wa, hb * wb
    vals = _one_pair_array(values, "values").astype(np.float64)
    idx = _one_pair_array(indices, "indices")
    if vals.shape != (la + lb,):
        raise ValueError(f"values: expected La + Lb = {la} + {lb} = {la + lb} entries for feature maps "
                         f"{ha}x{wa} and {hb}x{wb}, got {vals.shape[0] if vals.ndim else 'a scalar'}")
    if idx.shape != vals.shape:
        raise ValueError(f"indices: expected the shape of values {vals.shape}, got {idx.shape}")
    if idx.dtype.kind not in "iu":
        if idx.dtype.kind == "f" and np.all(np.equal(np.mod(idx, 1), 0)):
            idx = idx.astype(np.int64)
        else:
            raise ValueError(f"indices: expected integer location indices, got dtype {idx.dtype}")
    idx = idx.astype(np.int64)
    if la and (idx[:la].min() < 0 or idx[:la].max() >= lb):
        raise ValueError(f"indices: the first La = {la} entries must index b's {lb} locations; got values in "
                         f"[{idx[:la].min()}, {idx[:la].max()}] (are a and b swapped, or the sizes wrong?)")
    if lb and (idx[la:].min() < 0 or idx[la:].max() >= la):
        raise ValueError(f"indices: the last Lb = {lb} entries must index a's {la} locations; got values in "
                         f"[{idx[la:].min()}, {idx[la:].max()}] (are a and b swapped, or the sizes wrong?)")
    if strengths is None:
        strg = vals
    else:
        strg = _one_pair_array(strengths, "strengths").astype(np.float64)
        if strg.shape != vals.shape:
            raise ValueError(f"strengths: expected {vals.shape[0]} entries like values, got {strg.shape}")

    keep = np.zeros(la + lb, dtype=bool)
    if direction in ("both", "a_to_b"):
        keep[:la] = True
    if direction in ("both", "b_to_a"):
        keep[la:] = True
    keep &= ~np.isnan(strg)
    if threshold is not None:
        keep &= strg >= float(threshold)
    cand = np.flatnonzero(keep)
    order = cand[np.argsort(-strg[cand], kind="stable")]  # strongest first, ties by position
    if max_lines is not None:
        order = order[:int(max_lines)]
    if order.size == 0:
        return []

    src_a = order < la  # a -> b entries
    loc_a = np.where(src_a, order, idx[order])
    loc_b = np.where(src_a, idx[order], order - la)
    xy_a = location_centers(loc_a, wa, stride_a, offset_a, scale)
    xy_b = location_centers(loc_b, wb, stride_b, offset_b, scale)
    s = strg[order]
    lo = float(s.min()) if vmin is None else float(vmin)
    hi = float(s.max()) if vmax is None else float(vmax)
    out: List[Segment] = []
    for k, e in enumerate(order):
        if color is not None:
            c = tuple(int(v) for v in color)
        else:
            c = colormap(1.0 if hi <= lo else (s[k] - lo) / (hi - lo))
        out.append(Segment("a_to_b" if src_a[k] else "b_to_a", int(loc_a[k]), int(loc_b[k]),
                           (float(xy_a[k, 0]), float(xy_a[k, 1])), (float(xy_b[k, 0]), float(xy_b[k, 1])),
                           float(vals[e]), float(s[k]), c))  # type: ignore[arg-type]
    return out


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------

def _font(size: int):
    """A TrueType font of ``size`` pixels where Pillow has FreeType (Pillow >= 10.1), else the bitmap one."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> List[str]:
    lines: List[str] = []
    for para in text.split("\n"):
        words, cur = para.split(" "), ""
        for word in words:
            trial = word if not cur else cur + " " + word
            if cur and draw.textlength(trial, font=font) > width:
                lines.append(cur)
                cur = word
            else:
                cur = trial
        lines.append(cur)
    return lines


def _auto_scale(heights: Sequence[int], target: int = 256) -> float:
    """Integer zoom that makes the taller image at least ``target`` pixels high (at most 4x)."""
    h = max(heights)
    return float(min(4, max(1, math.ceil(target / max(h, 1)))))


def draw_matches(image_a: ImageInput, image_b: ImageInput, values: Any, indices: Any,
                 feature_size_a: Tuple[int, int], feature_size_b: Optional[Tuple[int, int]] = None, *,
                 strengths: Any = None, direction: str = "both", threshold: Optional[float] = None,
                 max_lines: Optional[int] = 50, stride: StrideArg = None,
                 image_size: Optional[Tuple[int, int]] = None, scale: Optional[float] = None, gap: int = 10,
                 line_width: int = 2, markers: bool = True, color: Optional[Color] = None,
                 colormap: Callable[[float], Color] = strength_colormap, vmin: Optional[float] = None,
                 vmax: Optional[float] = None, caption: Optional[str] = None, font_size: int = 12,
                 background: Color = (255, 255, 255), return_segments: bool = False) -> "DrawResult":
    """Draw precomputed matches of one pair: images side by side, a line per kept match.

    Args:
        image_a, image_b: paths, PIL images or ``H x W x 3`` arrays (a on the left).
        values, indices: the pair's ``[La + Lb]`` max values and argmax indices from
            ``qaconv_match(fea_a, fea_b, return_indices=True)`` (``[1, 1, La + Lb]`` also accepted).
        feature_size_a, feature_size_b: ``(h, w)`` of the two feature maps (b defaults to a's).
        strengths: per-entry strengths for threshold/ranking/colour (default ``values``), e.g.
            :func:`head_contributions`.
        direction: ``"both"``, ``"a_to_b"`` (each location of a to its best match in b) or ``"b_to_a"``.
        threshold: keep lines with strength ``>= threshold`` (None: all).
        max_lines: keep at most this many, strongest first (None: no cap).
        stride: feature stride in pixels of the (resized) images; None infers ``H / h`` and ``W / w``
            and checks they agree (a ``ValueError`` names the sizes otherwise).
        image_size: ``(H, W)`` to resize both images to first, normally the network's input size.
        scale: display zoom (None: an integer zoom to >= 256 pixels high); lines scale with it.
        gap: pixels between the two images. line_width, markers (end-point dots), color (one colour
            for all lines instead of ``colormap``), vmin/vmax (strengths mapped to the two ends of
            the colour map; default the kept lines' min and max), caption (text under the images),
            font_size, background: appearance.
        return_segments: also return the list of :class:`Segment` drawn, strongest first.

    Returns:
        the ``PIL.Image`` (and the segments).
    """
    from PIL import Image, ImageDraw

    img_a = load_image(image_a, "image_a")
    img_b = load_image(image_b, "image_b")
    if image_size is not None:
        H, W = _size_hw(image_size, "image_size")
        if img_a.size != (W, H):
            img_a = img_a.resize((W, H), Image.BILINEAR)
        if img_b.size != (W, H):
            img_b = img_b.resize((W, H), Image.BILINEAR)
    fsa = _size_hw(feature_size_a, "feature_size_a")
    fsb = _size_hw(feature_size_b if feature_size_b is not None else feature_size_a, "feature_size_b")
    stride_a = infer_stride((img_a.height, img_a.width), fsa, stride, "image_a")
    stride_b = infer_stride((img_b.height, img_b.width), fsb, stride, "image_b")
    if scale is None:
        scale = _auto_scale([img_a.height, img_b.height])
    scale = float(scale)
    if not scale > 0:
        raise ValueError(f"scale: must be positive, got {scale}")
    if int(gap) < 0:
        raise ValueError(f"gap: must be >= 0, got {gap}")
    wa, ha = max(1, round(img_a.width * scale)), max(1, round(img_a.height * scale))
    wb, hb = max(1, round(img_b.width * scale)), max(1, round(img_b.height * scale))
    if (wa, ha) != img_a.size:
        img_a = img_a.resize((wa, ha), Image.BICUBIC)
    if (wb, hb) != img_b.size:
        img_b = img_b.resize((wb, hb), Image.BICUBIC)

    ox_b = wa + int(gap)
    segments = correspondence_segments(
        values, indices, fsa, fsb, strengths=strengths, direction=direction, threshold=threshold,
        max_lines=max_lines, stride_a=stride_a, stride_b=stride_b, offset_a=(0.0, 0.0),
        offset_b=(float(ox_b), 0.0), scale=scale, color=color, colormap=colormap, vmin=vmin, vmax=vmax)

    width = ox_b + wb
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_lines = _wrap(probe, caption, font, width - 8) if caption else []
    line_h = font_size + 4
    cap_h = (len(text_lines) * line_h + 6) if text_lines else 0
    canvas = Image.new("RGB", (width, max(ha, hb) + cap_h), tuple(background))
    canvas.paste(img_a, (0, 0))
    canvas.paste(img_b, (ox_b, 0))
    draw = ImageDraw.Draw(canvas)
    lw = max(1, int(line_width))
    r = lw + 1 if markers else 0
    for seg in reversed(segments):  # weakest first, so the strongest end up on top
        pa = (round(seg.xy_a[0]), round(seg.xy_a[1]))
        pb = (round(seg.xy_b[0]), round(seg.xy_b[1]))
        draw.line([pa, pb], fill=seg.color, width=lw)
        if markers:
            for (x, y) in (pa, pb):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=seg.color)
    y = max(ha, hb) + 3
    for t in text_lines:
        draw.text((4, y), t, fill=(0, 0, 0), font=font)
        y += line_h
    return (canvas, segments) if return_segments else canvas


def draw_correspondences(image_a: ImageInput, image_b: ImageInput, fea_a: torch.Tensor, fea_b: torch.Tensor,
                         head: Optional[torch.nn.Module] = None, direction: str = "both",
                         threshold: Optional[float] = None, max_lines: Optional[int] = 50,
                         stride: StrideArg = None, *, reference: Any = None, normalize: bool = True,
                         caption: Union[bool, str] = True, return_segments: bool = False,
                         **draw_kwargs: Any) -> "DrawResult":
    """Draw QAConv's local correspondences between two person images.

    Args:
        image_a, image_b: paths, PIL images or arrays; ``image_a`` plays the query (left).
        fea_a, fea_b: their feature maps ``[d, h, w]`` or ``[1, d, h, w]`` (e.g. the backbone's output).
        head: optional :class:`qaconv_ext.QAConv` head. When given, each line's strength is
            the location's contribution to the score, ``fc_weight[slot] * BN(max similarity)``
            (eval-mode BN), and the caption shows the pair's logit; without it, the max similarity.
        reference: with ``head``, max values ``[La + Lb]`` or ``[M, La + Lb]`` of ``fea_a`` against
            reference gallery maps (e.g. ``qaconv_match(fea_a[None], gallery)[0]``): strengths become
            the contributions above the reference average (:func:`relative_contributions`).
        direction: ``"both"``, ``"a_to_b"`` or ``"b_to_a"``.
        threshold: keep lines whose strength is ``>= threshold``.
        max_lines: keep at most this many lines, strongest first (None: no cap).
        stride: feature stride (number or ``(sy, sx)``); None infers it from image and feature sizes
            and raises ``ValueError`` when they are inconsistent.
        normalize: L2-normalise the maps over channels before matching (as QAConv does).
        caption: True for an automatic caption (score and line counts), a string, or False.
        return_segments: also return the :class:`Segment` list drawn, strongest first.
        **draw_kwargs: passed to :func:`draw_matches` (``image_size``, ``scale``, ``gap``,
            ``line_width``, ``markers``, ``color``, ``colormap``, ``vmin``/``vmax``, ``font_size``, ...).

    Returns:
        a ``PIL.Image`` (and the segments).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    a = _feature_map(fea_a, "fea_a")
    b = _feature_map(fea_b, "fea_b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"fea_a and fea_b: channel counts differ ({a.shape[0]} vs {b.shape[0]})")
    values, indices = match_pair(a, b, normalize=normalize)
    strengths = None
    text = caption if isinstance(caption, str) else None
    if reference is not None and head is None:
        raise ValueError("reference: contributions relative to a reference need the QAConv head (head=...)")
    if head is not None:
        if reference is None:
            strengths = head_contributions(values, head)
            what = "head contribution"
        else:
            strengths = relative_contributions(values, reference, head)
            what = "head contribution above the gallery average"
        if caption is True:
            logit = float(head_logit(values, head))
            text = (f"QAConv logit {logit:.2f} (sigmoid {_sigmoid(logit):.3f}). "
                    f"Colour: {what}, blue (weak) to red (strong)")
    elif caption is True:
        text = (f"Mean max similarity {float(values.mean()):.3f}. "
                f"Colour: similarity, blue (weak) to red (strong)")
    canvas, segs = draw_matches(image_a, image_b, values, indices, tuple(a.shape[1:]), tuple(b.shape[1:]),
                                strengths=strengths, direction=direction, threshold=threshold,
                                max_lines=max_lines, stride=stride, caption=None, return_segments=True,
                                **{k: v for k, v in draw_kwargs.items() if k != "caption"})
    if text:
        la = a.shape[1] * a.shape[2]
        n_dir = {"both": values.numel(), "a_to_b": la, "b_to_a": values.numel() - la}[direction]
        shown = f"{len(segs)} of {n_dir} matches shown ({direction.replace('_', ' ')}"
        if threshold is not None:
            shown += f", strength >= {threshold:g}"
        shown += ")"
        vmin, vmax = draw_kwargs.get("vmin"), draw_kwargs.get("vmax")
        if vmin is not None and vmax is not None and draw_kwargs.get("color") is None:
            shown += f"; colour scale {vmin:.3g} to {vmax:.3g}"
        canvas = _add_caption(canvas, f"{text}. {shown}", draw_kwargs.get("font_size", 12),
                              draw_kwargs.get("background", (255, 255, 255)))
    return (canvas, segs) if return_segments else canvas


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _add_caption(canvas, text: str, font_size: int, background: Color):
    from PIL import Image, ImageDraw

    font = _font(font_size)
    draw = ImageDraw.Draw(canvas)
    lines = _wrap(draw, text, font, canvas.width - 8)
    line_h = font_size + 4
    out = Image.new("RGB", (canvas.width, canvas.height + len(lines) * line_h + 6), tuple(background))
    out.paste(canvas, (0, 0))
    d = ImageDraw.Draw(out)
    y = canvas.height + 3
    for t in lines:
        d.text((4, y), t, fill=(0, 0, 0), font=font)
        y += line_h
    return out
