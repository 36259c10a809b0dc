"""What stops or skips a training step: a NaN/Inf step never changes the weights or the optimizer state
(`agree_bad_step`, `held`) and stops the run or is skipped (`stop_or_skip`); SIGTERM/SIGINT ask for a checkpoint
at the next step boundary (`StopFlag`)."""
from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path

import torch

from .. import parallel
from . import checkpoint


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm was NaN or Inf, and no more such steps may be skipped."""


class StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint at the next step boundary instead of losing the work."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        return parallel.all_reduce_mean([float(self.requested)])[0] > 0

    def restore(self) -> None:
        """Give the handlers back (a caller running several jobs in one process keeps its own)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def plain_optimizer(optimizer) -> bool:
    """A plain torch optimizer (ZeRO 0, fp32): DeepSpeed's engine finds no `overflow` flag on it, so nothing
    in DeepSpeed checks its gradients. Its own optimizers (ZeRO 1/2, bf16) check the gradient norm and skip a
    non-finite step themselves, counting it in `engine.skipped_steps`."""
    return not hasattr(optimizer, "overflow")


def agree_bad_step(engine, bad: torch.Tensor) -> bool:
    """At an accumulation boundary, before `engine.step()`: is this step bad on any rank? Bad (`bad`, on the
    device): a non-finite loss in the window, or, for a plain torch optimizer, non-finite gradients (DeepSpeed
    checks the others)."""
    if plain_optimizer(engine.optimizer):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if grads:
            bad = bad | ~torch.nn.utils.get_total_norm(grads).isfinite()
    return parallel.all_reduce_mean([float(bad)])[0] > 0


@contextlib.contextmanager
def held(optimizer, bad: bool):
    """Around `engine.step()`: a bad step must change nothing. A plain torch optimizer's `step` does nothing for
    this call (the engine drops the gradients after it); DeepSpeed's own optimizers skip it themselves. Either
    way `engine.step()` runs, so DeepSpeed's micro-step and step counters stay in order."""
    if not (bad and plain_optimizer(optimizer)):
        yield
        return
    optimizer.step = lambda closure=None: None  # shadows the method for this one call
    try:
        yield
    finally:
        del optimizer.step


def stop_or_skip(step: int, loss: float, count: int, allowed: int, ckpt_dir: Path) -> None:
    """A bad step (already kept from changing the weights): stop, or say it was skipped."""
    loss = parallel.all_reduce_mean([loss])[0]
    if count > allowed:
        kept = checkpoint.latest_tag(ckpt_dir) or "none yet"
        raise NonFiniteError(f"step {step}: the loss or gradient norm is not finite (mean loss {loss}); stopped "
                             f"without applying it or saving (newest checkpoint: {kept}): lower the learning rate, "
                             f"or skip up to K such steps with --skip_nonfinite K (now {allowed})")
    if parallel.rank() == 0:
        print(f"warning: step {step}: the loss or gradient norm is not finite (mean loss {loss}); step skipped "
              f"({count} of --skip_nonfinite {allowed})", file=sys.stderr, flush=True)
