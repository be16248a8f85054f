"""QAConv's matching head: BN1d(1) -> FC -> BN1d(1) over the max-pooled local similarities.

Two layouts (see DESIGN §2):

* ``"v2"`` (v2.1 and later public code): ``fc = Linear(L, 1)`` shared by the two directions, weight
  initialised to ``1 / L``; the FC is applied to the ``L`` query-location maxima and to the ``L``
  gallery-location maxima and the two outputs are summed (the bias counts twice). Symmetric.
* ``"eccv"`` (ECCV 2020, v1.0): ``fc = Linear(2L, 1)`` over the concatenation
  ``[gallery-location maxima ; query-location maxima]``. Not symmetric.

State-dict keys are ``bn.*``, ``fc.*``, ``logit_bn.*`` in both, as in the public checkpoints.

Training mode runs :func:`qaconv_ext.qaconv_match` and normalises the values with batch statistics
(one mean/variance over every max value of the call). Eval mode folds both BatchNorms and the FC
into one weight per max value plus a bias (:meth:`QAConv.folded`) and calls
:func:`qaconv_ext.qaconv_score`, which writes one float per pair.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .ops import qaconv_match, qaconv_score
from .ops.dtypes import accumulation_dtype

__all__ = ["QAConv", "normalize_layout", "head_from_state_dict"]

_LAYOUTS = {"v2": "v2", "v2.1": "v2", "shared": "v2", "eccv": "eccv", "v1": "eccv", "v1.0": "eccv"}


def normalize_layout(layout: str) -> str:
    """``"v2"`` or ``"eccv"`` for any accepted spelling (``v2.1``, ``v1``, ...)."""
    key = str(layout).lower()
    if key not in _LAYOUTS:
        raise ValueError(f"unknown QAConv head layout {layout!r}; use 'v2' or 'eccv'")
    return _LAYOUTS[key]


def _bn_affine(bn: nn.BatchNorm1d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm1d(1) as ``y = a * x + b`` (0-d tensors, differentiable in gamma/beta)."""
    if bn.running_mean is None or bn.running_var is None:
        raise RuntimeError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    a = bn.running_var.reshape(()).add(bn.eps).rsqrt()
    if bn.weight is not None:
        a = a * bn.weight.reshape(())
    b = -a * bn.running_mean.reshape(())
    if bn.bias is not None:
        b = b + bn.bias.reshape(())
    return a, b


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

    def head(self, values: torch.Tensor) -> torch.Tensor:
        """Apply BN -> FC -> BN to max values ``[..., 2L]`` (op order: query-location maxima first).

        Uses batch statistics in training mode (over every value of the call) and running statistics
        in eval mode. Returns ``[...]``.
        """
        L = self.num_locations
        if values.shape[-1] != 2 * L:
            raise ValueError(f"QAConv: expected {2 * L} max values per pair, got {values.shape[-1]}")
        lead = values.shape[:-1]
        # BatchNorm1d(1) over every value: as one [1, 1, n] sequence, which torch reduces far faster
        # than n rows of one channel (same statistics, same running-average update).
        x = self.bn(values.reshape(1, 1, -1)).reshape(*lead, 2, L)
        if self.layout == "v2":
            x = F.linear(x, self.fc.weight, self.fc.bias).sum(dim=-2)  # [..., 1]
        else:
            x = torch.cat((x[..., 1, :], x[..., 0, :]), dim=-1)  # [gallery maxima ; query maxima]
            x = F.linear(x, self.fc.weight, self.fc.bias)
        return self.logit_bn(x.reshape(1, 1, -1)).reshape(lead)

    def folded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode head as ``(weight [2L], bias [])``: ``logit = values @ weight + bias``.

        ``weight`` is in the op's value order (query-location maxima first). Built from the running
        statistics (whatever the module's mode); differentiable in the head's parameters.
        """
        L = self.num_locations
        a1, b1 = _bn_affine(self.bn)
        a2, b2 = _bn_affine(self.logit_bn)
        w = self.fc.weight.reshape(-1)
        c = self.fc.bias.reshape(()) if self.fc.bias is not None else w.new_zeros(())
        if self.layout == "v2":
            slots = torch.cat((w, w))
            inner_bias = 2.0 * (b1 * w.sum() + c)
        else:
            slots = torch.cat((w[L:], w[:L]))
            inner_bias = b1 * w.sum() + c
        return a2 * a1 * slots, a2 * inner_bias + b2

    def forward(self, prob_fea: torch.Tensor, gal_fea: torch.Tensor) -> torch.Tensor:
        """Logits ``[P, N]`` of every probe against every gallery map."""
        self._check("prob_fea", prob_fea)
        self._check("gal_fea", gal_fea)
        if prob_fea.dtype != gal_fea.dtype:
            dtype = torch.promote_types(prob_fea.dtype, gal_fea.dtype)
            prob_fea, gal_fea = prob_fea.to(dtype), gal_fea.to(dtype)
        if self.training:
            return self.head(qaconv_match(prob_fea, gal_fea))
        weight, bias = self.folded()
        wdtype = accumulation_dtype(prob_fea.dtype)
        return qaconv_score(prob_fea, gal_fea, weight.to(wdtype), bias.to(wdtype))


def head_from_state_dict(state: Mapping[str, Any], num_features: int, height: int, width: int,
                         layout: Optional[str] = None) -> QAConv:
    """A :class:`QAConv` loaded from a head state dict or a public checkpoint's ``criterion``.

    Accepts keys ``bn.*``/``fc.*``/``logit_bn.*`` with an optional ``matcher.`` prefix (v1.3+
    ``ClassMemoryLoss``); other entries (``class_memory``, ``valid_class``) are ignored. The layout
    is inferred from the FC size unless given. The result is in eval mode.
    """
    prefix = "matcher." if any(k.startswith("matcher.") for k in state) else ""
    sub = {k[len(prefix):]: v for k, v in state.items()
           if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0] in ("bn", "fc", "logit_bn")}
    if "fc.weight" not in sub:
        raise KeyError(f"no QAConv head in this state dict (keys: {sorted(state)[:8]} ...)")
    L = int(height) * int(width)
    if layout is None:
        n = sub["fc.weight"].numel()
        if n not in (L, 2 * L):
            raise ValueError(f"fc.weight has {n} entries; a {height}x{width} head needs {L} (v2) or {2 * L} (eccv)")
        layout = "v2" if n == L else "eccv"
    head = QAConv(num_features, height, width, layout=layout)
    head.load_state_dict(sub)
    return head.eval()
