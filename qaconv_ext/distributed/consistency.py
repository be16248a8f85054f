"""Start-up check that every rank was given the same options."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

from .collectives import all_gather_objects

__all__ = ["option_mismatches", "check_same_options"]


def option_mismatches(per_rank: List[Mapping[str, Any]]) -> Dict[str, List[Any]]:
    """``{option: [value on rank 0, rank 1, ...]}`` for every option whose value differs across ranks."""
    keys = sorted({k for opts in per_rank for k in opts})
    out = {}
    for k in keys:
        values = [opts.get(k) for opts in per_rank]
        if any(v != values[0] for v in values[1:]):
            out[k] = values
    return out


def check_same_options(options: Mapping[str, Any], command: str = "qaconv") -> None:
    """Compare ``options`` (small, picklable) across ranks; on a difference every rank raises
    ``SystemExit`` with one line naming the options and their values per rank. No-op in one process."""
    bad = option_mismatches(all_gather_objects(dict(options)))
    if bad:
        listed = "; ".join(f"{k} = {' / '.join(repr(v) for v in vals)}" for k, vals in bad.items())
        raise SystemExit(f"{command}: the ranks were given different options (rank 0 / 1 / ...): {listed}")
