"""QAConv's matching head: BN1d(1) -> FC -> BN1d(1) over the max-pooled local similarities.

Two layouts:

* ``"v2"`` (v2.1 and later public code): ``fc = Linear(L, 1)`` shared by the two directions, weight
  initialised to ``1 / L``; the FC is applied to the ``L`` query-location maxima and to the ``L``
  gallery-location maxima and the two outputs are summed (the bias counts twice). Symmetric.
* ``"eccv"`` (ECCV 2020, v1.0): ``fc = Linear(2L, 1)`` over the concatenation
  ``[gallery-location maxima ; query-location maxima]``. Not symmetric.

``_LAYOUTS`` is the one list of accepted layout names; :func:`normalize_layout` maps a name to one
of the two and raises the one error for any other.

State-dict keys are ``bn.*``, ``fc.*``, ``logit_bn.*`` in both, as in the public checkpoints;
:meth:`QAConv.from_state_dict` builds a head from one.

Training mode runs :func:`qaconv_ext.qaconv_match` and normalises the values with batch statistics
(one mean/variance over every max value of the call). Eval mode folds both BatchNorms and the FC
into one weight per max value plus a bias (:meth:`QAConv.folded`) and calls
:func:`qaconv_ext.qaconv_score`, which writes one float per pair. The same eval-mode algebra, per
max value, is :meth:`QAConv.slot_weights`, :meth:`QAConv.contributions` and :meth:`QAConv.logit`
(what the correspondence pictures draw).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .ops import qaconv_match, qaconv_score
from .ops.dtypes import score_weights

__all__ = ["QAConv", "normalize_layout", "head_from_state_dict", "extract_head_state"]

#: Every accepted spelling of a layout name (lower case) -> ``"v2"`` or ``"eccv"``.
_LAYOUTS = {"v2": "v2", "v2.1": "v2", "shared": "v2", "eccv": "eccv", "v1": "eccv", "v1.0": "eccv"}

#: The head's entries in a state dict (and in the public code's ``criterion``, under ``matcher.``).
_HEAD_MODULES = ("bn", "fc", "logit_bn")


def normalize_layout(layout: str) -> str:
    """``"v2"`` or ``"eccv"`` for any accepted spelling (``v2.1``, ``v1``, ...); ``ValueError`` otherwise."""
    key = str(layout).lower()
    if key not in _LAYOUTS:
        raise ValueError(f"unknown QAConv head layout {layout!r}; use 'v2' or 'eccv' "
                         f"(accepted spellings: {', '.join(_LAYOUTS)})")
    return _LAYOUTS[key]


def _bn_affine(bn: nn.BatchNorm1d, dtype: Optional[torch.dtype] = None,
               device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm1d(1) as ``y = a * x + b`` (0-d tensors, differentiable in gamma/beta).

    The BatchNorm's tensors are converted to ``dtype``/``device`` first when given (the per-maximum
    contributions work in the values' dtype, float64 for the pictures); the arithmetic is the same
    in every dtype.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise RuntimeError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")

    def scalar(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(()).to(device=device, dtype=dtype)

    a = scalar(bn.running_var).add(bn.eps).rsqrt()
    if bn.weight is not None:
        a = a * scalar(bn.weight)
    b = -a * scalar(bn.running_mean)
    if bn.bias is not None:
        b = b + scalar(bn.bias)
    return a, b


def extract_head_state(state: Mapping[str, Any]) -> Dict[str, Any]:
    """The head's ``bn.*``/``fc.*``/``logit_bn.*`` entries of a state dict.

    Also reads a public checkpoint's ``criterion``: the v1.3+ ``ClassMemoryLoss`` keeps the head under
    ``matcher.`` (the prefix is removed); other entries (``class_memory``, ``valid_class``) are dropped.
    Raises ``KeyError`` when there is no ``fc.weight``.
    """
    prefix = "matcher." if any(k.startswith("matcher.") for k in state) else ""
    sub = {k[len(prefix):]: v for k, v in state.items()
           if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0] in _HEAD_MODULES}
    if "fc.weight" not in sub:
        raise KeyError(f"no QAConv head in this state dict (keys: {sorted(state)[:8]} ...)")
    return sub


class QAConv(nn.Module):
    """The QAConv head for ``num_features x height x width`` feature maps.

    ``forward(prob_fea [P, d, h, w], gal_fea [N, d, h, w]) -> logits [P, N]`` (higher = more similar).
    Both maps must have the head's ``height x width`` (``L = height * width`` locations).
    """

    def __init__(self, num_features: int, height: int, width: int, layout: str = "v2") -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.height = int(height)
        self.width = int(width)
        self.layout = normalize_layout(layout)
        L = self.height * self.width
        self.bn = nn.BatchNorm1d(1)
        self.fc = nn.Linear(L if self.layout == "v2" else 2 * L, 1)
        self.logit_bn = nn.BatchNorm1d(1)
        self.reset_parameters()

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], num_features: Optional[int] = None,
                        height: Optional[int] = None, width: Optional[int] = None,
                        layout: Optional[str] = None) -> "QAConv":
        """A head (in eval mode) loaded from a head state dict or a public checkpoint's ``criterion``.

        Reads the entries :func:`extract_head_state` finds. What the FC's size fixes is inferred: the
        layout from ``height x width`` (``L`` weights: ``"v2"``, ``2L``: ``"eccv"``), or with a layout
        given, the number of locations, so that one of ``height``/``width`` gives the other.
        ``num_features`` (the channel count inputs are checked against) is not in a head's state dict
        and must be given. Raises ``KeyError`` for missing entries and ``ValueError`` for what does not
        fit, each with a one-line message.
        """
        sub = extract_head_state(state_dict)
        if num_features is None:
            raise ValueError("QAConv.from_state_dict: a head's state dict does not hold the channel count; "
                             "give num_features")
        n = sub["fc.weight"].numel()
        if layout is None:
            if height is None or width is None:
                raise ValueError(f"QAConv.from_state_dict: fc.weight has {n} entries; give height and width "
                                 f"(the layout follows from them) or the layout")
            L = int(height) * int(width)
            if n not in (L, 2 * L):
                raise ValueError(f"QAConv.from_state_dict: fc.weight has {n} entries; a {height}x{width} head "
                                 f"needs {L} (v2) or {2 * L} (eccv)")
            layout = "v2" if n == L else "eccv"
        else:
            layout = normalize_layout(layout)
            L = n if layout == "v2" else n // 2
            if height is None and width is None:
                raise ValueError(f"QAConv.from_state_dict: fc.weight fixes L = {L} locations of a {layout} head "
                                 f"but not their height x width; give height or width")
            if height is None or width is None:
                given = int(width if height is None else height)
                if given <= 0 or L % given:
                    raise ValueError(f"QAConv.from_state_dict: fc.weight has {n} entries, which no {layout} head "
                                     f"{'width' if height is None else 'height'} {given} fits (L = {L} locations)")
                height, width = (L // given, given) if height is None else (given, L // given)
        head = cls(num_features, height, width, layout=layout)
        own = head.state_dict()
        missing = [k for k in own if k not in sub and not k.endswith("num_batches_tracked")]
        if missing:
            raise KeyError(f"QAConv.from_state_dict: missing {', '.join(missing)}")
        unexpected = [k for k in sub if k not in own]
        if unexpected:
            raise ValueError(f"QAConv.from_state_dict: unexpected entries {', '.join(unexpected)}")
        for k, v in sub.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"QAConv.from_state_dict: {k} has shape {tuple(v.shape)}; a {head.height}x"
                                 f"{head.width} {head.layout} head needs {tuple(own[k].shape)}")
        head.load_state_dict(sub)
        return head.eval()

    @property
    def num_locations(self) -> int:
        """``L = height * width``."""
        return self.height * self.width

    def reset_running_stats(self) -> None:
        """Reset both BatchNorms' running statistics."""
        self.bn.reset_running_stats()
        self.logit_bn.reset_running_stats()

    def reset_parameters(self) -> None:
        """BatchNorms to identity; v2: FC weight ``1 / L`` (bias: ``nn.Linear``'s default draw);
        eccv: ``nn.Linear``'s default initialisation."""
        self.bn.reset_parameters()
        self.logit_bn.reset_parameters()
        self.fc.reset_parameters()
        if self.layout == "v2":
            with torch.no_grad():
                self.fc.weight.fill_(1.0 / self.num_locations)

    def extra_repr(self) -> str:
        return (f"num_features={self.num_features}, height={self.height}, width={self.width}, "
                f"layout={self.layout!r}")

    # ------------------------------------------------------------------------------------------
    def _check(self, name: str, fea: torch.Tensor) -> None:
        if fea.dim() != 4:
            raise ValueError(f"QAConv: {name} must be [B, d, h, w], got shape {tuple(fea.shape)}")
        if fea.shape[1] != self.num_features:
            raise ValueError(f"QAConv: {name} has {fea.shape[1]} channels, the head expects {self.num_features}")
        if tuple(fea.shape[2:]) != (self.height, self.width):
            raise ValueError(f"QAConv: {name} is a {fea.shape[2]}x{fea.shape[3]} map, the head was built for "
                             f"{self.height}x{self.width}")

    def _check_values(self, values: torch.Tensor) -> None:
        L = self.num_locations
        if values.dim() == 0 or values.shape[-1] != 2 * L:
            got = values.shape[-1] if values.dim() else "a scalar"
            raise ValueError(f"QAConv: expected {2 * L} max values per pair, got {got}; the feature maps must "
                             f"have the head's height x width ({self.height}x{self.width})")

    def _fc_terms(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(FC weight [n], FC bias [], the FC weight of each max value in the op's order [2L],
        FC applications per pair)``: the one place that reads the layout's FC arrangement."""
        w = self.fc.weight.reshape(-1)
        c = self.fc.bias.reshape(()) if self.fc.bias is not None else w.new_zeros(())
        if normalize_layout(self.layout) == "v2":  # one Linear(L, 1) applied to each direction
            return w, c, torch.cat((w, w)), 2
        L = self.num_locations  # one Linear(2L, 1) over [gallery-location maxima ; query-location maxima]
        return w, c, torch.cat((w[L:], w[:L])), 1

    def slot_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The FC weight that multiplies each BN-normalised max value, in the op's value order
        (``[2L]``, query-location maxima first), and the FC bias total per pair (``[]``: twice the bias
        for ``"v2"``, whose FC is applied to both directions). Differentiable in the FC."""
        _, c, slots, uses = self._fc_terms()
        return slots, c * uses

    def contributions(self, values: torch.Tensor) -> torch.Tensor:
        """Each max value's contribution to the pair's score: ``slot_weight * BN(value)``.

        ``values`` is ``[..., 2L]`` in :func:`qaconv_ext.qaconv_match`'s order; the result has the same
        shape, on the values' device, in their dtype (promoted with the head's). BN is the first
        BatchNorm in eval mode (running statistics, whatever the module's mode). Summed, plus the
        bias total of :meth:`slot_weights`, they give the FC output, which ``logit_bn`` turns into
        the logit (:meth:`logit`). Differentiable in the head's parameters.
        """
        values = torch.as_tensor(values)
        self._check_values(values)
        dtype = torch.promote_types(values.dtype, self.fc.weight.dtype)
        values = values.to(dtype)
        slots, _ = self.slot_weights()
        a1, b1 = _bn_affine(self.bn, dtype, values.device)
        return slots.to(device=values.device, dtype=dtype) * (a1 * values + b1)

    def logit(self, values: torch.Tensor) -> torch.Tensor:
        """The eval-mode logit ``[...]`` of max values ``[..., 2L]`` through :meth:`contributions`:
        ``logit_bn(sum of contributions + bias total)`` (in the values' dtype, promoted with the head's)."""
        c = self.contributions(values)
        _, bias_total = self.slot_weights()
        a2, b2 = _bn_affine(self.logit_bn, c.dtype, c.device)
        return a2 * (c.sum(-1) + bias_total.to(device=c.device, dtype=c.dtype)) + b2

    def head(self, values: torch.Tensor) -> torch.Tensor:
        """Apply BN -> FC -> BN to max values ``[..., 2L]`` (op order: query-location maxima first).

        Uses batch statistics in training mode (over every value of the call) and running statistics
        in eval mode. Returns ``[...]``.
        """
        self._check_values(values)
        L = self.num_locations
        lead = values.shape[:-1]
        # BatchNorm1d(1) over every value: as one [1, 1, n] sequence, which torch reduces far faster
        # than n rows of one channel (same statistics, same running-average update).
        x = self.bn(values.reshape(1, 1, -1)).reshape(*lead, 2, L)
        if normalize_layout(self.layout) == "v2":
            x = F.linear(x, self.fc.weight, self.fc.bias).sum(dim=-2)  # [..., 1]
        else:
            x = torch.cat((x[..., 1, :], x[..., 0, :]), dim=-1)  # [gallery maxima ; query maxima]
            x = F.linear(x, self.fc.weight, self.fc.bias)
        return self.logit_bn(x.reshape(1, 1, -1)).reshape(lead)

    def folded(self, dtype: Optional[torch.dtype] = None, device: Any = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode head as ``(weight [2L], bias [])``: ``logit = values @ weight + bias``.

        ``weight`` is in the op's value order (query-location maxima first). Built from the running
        statistics (whatever the module's mode, which is left as it is); differentiable in the head's
        parameters. With ``dtype`` (the feature maps' dtype) or ``device``: cast as the op takes them
        for such maps (:func:`qaconv_ext.ops.dtypes.score_weights`: the accumulation dtype).
        """
        a1, b1 = _bn_affine(self.bn)
        a2, b2 = _bn_affine(self.logit_bn)
        w, c, slots, uses = self._fc_terms()
        # each application of the FC adds its bias and the first BatchNorm's shift times its weights
        inner_bias = (b1 * w.sum() + c) * uses
        weight, bias = a2 * a1 * slots, a2 * inner_bias + b2
        if dtype is None and device is None:
            return weight, bias
        return score_weights(weight, bias, weight.dtype if dtype is None else dtype, device)

    def forward(self, prob_fea: torch.Tensor, gal_fea: torch.Tensor) -> torch.Tensor:
        """Logits ``[P, N]`` of every probe against every gallery map."""
        self._check("prob_fea", prob_fea)
        self._check("gal_fea", gal_fea)
        if prob_fea.dtype != gal_fea.dtype:
            dtype = torch.promote_types(prob_fea.dtype, gal_fea.dtype)
            prob_fea, gal_fea = prob_fea.to(dtype), gal_fea.to(dtype)
        if self.training:
            return self.head(qaconv_match(prob_fea, gal_fea))
        return qaconv_score(prob_fea, gal_fea, *self.folded(prob_fea.dtype))


def head_from_state_dict(state: Mapping[str, Any], num_features: int, height: int, width: int,
                         layout: Optional[str] = None) -> QAConv:
    """:meth:`QAConv.from_state_dict` (kept under this name)."""
    return QAConv.from_state_dict(state, num_features, height, width, layout)
