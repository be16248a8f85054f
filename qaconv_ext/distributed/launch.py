"""What a command does when ``torchrun`` started it: join the group, check the ranks agree, let only
rank 0 speak."""
from __future__ import annotations

import contextlib
import io
from typing import Any, Iterator, Mapping, Optional

from .consistency import check_same_options
from .env import DEFAULT_TIMEOUT_S, DistEnv, init_from_env, launched

__all__ = ["join_if_launched", "main_rank_output"]


def join_if_launched(device: str, options: Mapping[str, Any], command: str,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> Optional[DistEnv]:
    """Under a launcher: join the process group (gloo on the CPU, nccl on CUDA, this rank's GPU) and
    stop every rank with one line when ``options`` differ across ranks; returns the :class:`DistEnv`.
    Without a launcher: ``None`` (one process, nothing changes)."""
    if not launched():
        return None
    env = init_from_env(device, timeout_s=timeout_s)
    check_same_options(options, command)
    return env


@contextlib.contextmanager
def main_rank_output(env: Optional[DistEnv]) -> Iterator[None]:
    """Inside: what ranks other than 0 print to stdout is dropped (rank 0 and one process print as usual)."""
    if env is None or env.is_main:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
