"""Stopping a training run cleanly: SIGINT/SIGTERM set a flag that the loop checks between steps,
and every rank stops at the same step."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading

import torch
import torch.distributed as dist

from devices import Dist

logger = logging.getLogger(__name__)

# Exit statuses of a run stopped by a signal (128 + the signal's number, as shells report it).
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes the current step, saves last.pt and exits."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now (saves are atomic)
        self.signum = signum
        logger.warning("%s received: finishing this step, then saving last.pt",
                       signal.Signals(signum).name)

    def __bool__(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_signals(flag: StopFlag):
    """Route SIGINT/SIGTERM to `flag` while training (main thread only), then restore."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def any_rank(flag: bool, device: torch.device, d: Dist) -> bool:
    """True when `flag` is set on any rank, so that all ranks stop at the same step."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)
