"""Training metrics: `metrics.jsonl`, TensorBoard through DeepSpeed's monitor, a progress bar (rank 0), and the
FLOPs and MFU figures of a row."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from .. import parallel
from ..ds_config import DeepSpeedSettings
from ..run_args import TrainArgs
from ..analysis.flops import achieved_flops, mfu
from ..analysis.hardware import peak_flops
from ..moe import CAMExMoE


def layer_stats(model) -> dict:
    """Every MoE layer's own statistics (`stats()`: router, curvature, task vectors), tagged with its index
    (`router/layer3/entropy`) and averaged over the ranks: under expert parallelism each rank sees its own experts
    and tokens, and as every rank holds as many experts and tokens, the mean over ranks is the mean over all of
    them (`router/max_load`: the ranks' mean of their own largest share). One all-reduce: every rank calls this
    at the same steps. A dynamic chain's continuing layers measure their task vectors against the chain's base."""
    stats, chain_base = {}, None
    for index, layer in model.moe_layers():
        if isinstance(layer, CAMExMoE):
            chain_base = layer.base if layer.base is not None else chain_base
            own = layer.stats(chain_base)
        else:
            own = layer.stats()
        for key, value in own.items():
            group, name = key.split("/", 1)
            stats[f"{group}/layer{index}/{name}"] = value
    return dict(zip(stats, parallel.all_reduce_mean(list(stats.values()))))


def layer_means(stats: dict) -> dict:
    """`layer_stats` averaged over the layers that report each one, under flat names (`router/layer3/entropy` ->
    `router_entropy`): the diagnostics of metrics.jsonl rows and final_metrics.json."""
    by_name = {}
    for key, value in stats.items():
        group, _, name = key.split("/", 2)
        by_name.setdefault(f"{group}_{name}", []).append(value)
    return {name: sum(values) / len(values) for name, values in by_name.items()}


def mfu_peak(args: TrainArgs, ds_config: dict) -> Optional[float]:
    """Peak FLOP/s for MFU: --peak_tflops, else the GPU datasheet table, else a CPU matmul probe."""
    dtype = "bf16" if DeepSpeedSettings.from_dict(ds_config).bf16 else "fp32"
    override = None if args.peak_tflops is None else args.peak_tflops * 1e12
    try:
        return peak_flops(dtype=dtype, override=override)
    except ValueError as e:
        print(f"warning: no MFU reported ({e})")
        return None


def flops_row(tokens: int, tokens_per_s: float, flops_per_token_train: float, peak: Optional[float]) -> dict:
    """Cumulative training FLOPs, achieved FLOP/s of the whole job, and MFU against every rank's peak."""
    row = {"train_flops": tokens * flops_per_token_train, "flops_per_token": flops_per_token_train,
           "achieved_flops_per_s": achieved_flops(tokens_per_s, flops_per_token_train)}
    if peak:
        row["mfu"] = mfu(tokens_per_s, flops_per_token_train, peak * parallel.world_size())
    return row


class MetricsLogger:
    """Rank 0 writes; other ranks keep the same call sites and do nothing."""

    def __init__(self, output_dir: os.PathLike, engine, is_main: bool, progress: bool, total_steps: int,
                 start_step: int):
        self.is_main, self.engine = is_main, engine
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar: Optional[tqdm] = None
        if is_main:
            self._truncate_after(start_step)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows a crashed run logged after its checkpoint: they will be logged again."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _row_step(line) is not None and _row_step(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, row: dict, tensorboard: Optional[dict] = None) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        events = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        events.update(tensorboard or {})
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and monitor.enabled:
            monitor.write_events([(f"camex/{k}", v, row["step"]) for k, v in events.items()])

    def advance(self, step: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        monitor = getattr(self.engine, "monitor", None)
        tb = getattr(monitor, "tb_monitor", None)
        if tb is not None and getattr(tb, "summary_writer", None) is not None:
            tb.summary_writer.flush()


def _row_step(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
