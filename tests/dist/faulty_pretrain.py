"""launcher/pretrain.py with one fault injected from the test side (the production loop has no hooks).

Run it like the launcher, as the module `tests.dist.faulty_pretrain` from the repository root (`python -m`,
`deepspeed --module`, or as rank processes). `CAMEX_FAULT` says what happens, `RANK:SIGNAL:POINT:N`: rank RANK
sends itself SIGNAL (KILL or STOP) at its N-th (1-based) POINT event:

* `save`: an event of a checkpoint save, in order: each file written (`torch.save`: once just before the
  file is opened, once after half of it is on disk), each file hashed for the manifest, and each atomic
  replace (manifest, zero_to_fp32.py, `latest`) just before it happens;
* `step`: an optimizer step, just before `engine.step()` at an accumulation boundary.

With `CAMEX_FAULT_LOG=PATH`, every rank appends its save events (`RANK EVENT FILE`) to PATH, so a test
can count them, and the faulty rank `RANK fired TIME` (time.time()) just before its signal. Without
either variable, the script is the launcher.
"""
import io
import os
import signal
import sys
import time
from pathlib import Path

from camex_ds.cli import pretrain


def install(spec: str, log: str) -> None:
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    from camex_ds.train import checkpoint, manifest

    rank = int(os.environ.get("RANK", "0"))
    target, sig, point, n = spec.split(":") if spec else ("-1", "KILL", "none", "0")
    fire = int(target) == rank
    signum, n = getattr(signal, f"SIG{sig}"), int(n)
    seen = {"save": 0, "step": 0}
    saving = [False]

    def event(kind: str, name: str) -> None:
        if kind == "save" and not saving[0]:
            return
        seen[kind] += 1
        if log and kind == "save":
            with open(log, "a") as f:
                f.write(f"{rank} {name}\n")
        if fire and kind == point and seen[kind] == n:
            if log:
                with open(log, "a") as f:
                    f.write(f"{rank} fired {time.time()}\n")
            os.kill(os.getpid(), signum)

    real_save, real_replace, real_sha = torch.save, os.replace, manifest._sha256
    real_step, real_ckpt_save = DeepSpeedEngine.step, checkpoint.save

    def save(obj, f, *args, **kwargs):
        if not saving[0] or not isinstance(f, (str, os.PathLike)):
            return real_save(obj, f, *args, **kwargs)
        event("save", f"write {Path(f).name}")
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(f, "wb") as out:
            out.write(data[:len(data) // 2])
            out.flush()
            event("save", f"half-written {Path(f).name}")  # a fault here leaves a torn file
            out.write(data[len(data) // 2:])

    def replace(src, dst, *args, **kwargs):
        event("save", f"replace {Path(dst).name}")
        return real_replace(src, dst, *args, **kwargs)

    def sha(path):
        event("save", f"hash {Path(path).name}")
        return real_sha(path)

    def step(self, *args, **kwargs):
        if self.is_gradient_accumulation_boundary():
            event("step", "step")
        return real_step(self, *args, **kwargs)

    def ckpt_save(*args, **kwargs):
        saving[0] = True
        try:
            return real_ckpt_save(*args, **kwargs)
        finally:
            saving[0] = False

    torch.save, os.replace, manifest._sha256 = save, replace, sha
    DeepSpeedEngine.step, checkpoint.save = step, ckpt_save


def main(argv=None) -> int:
    if os.environ.get("CAMEX_FAULT") or os.environ.get("CAMEX_FAULT_LOG"):
        install(os.environ.get("CAMEX_FAULT", ""), os.environ.get("CAMEX_FAULT_LOG", ""))
    return pretrain.main(argv)


if __name__ == "__main__":
    sys.exit(main())
