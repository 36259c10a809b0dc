"""Training metrics: `metrics.jsonl`, TensorBoard through DeepSpeed's monitor, and a progress bar (rank 0)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from ..moe import CAMExMoE
from ..moe.token_moe import TokenMoE


def router_stats(model) -> dict:
    """Per MoE layer: router entropy (nats) and the largest expert's share of routed segments/tokens."""
    stats = {}
    for index, layer in model.moe_layers():
        if isinstance(layer, CAMExMoE) and layer.router.last_stats:
            s = layer.router.last_stats
            stats[f"router/layer{index}/entropy"] = float(s["entropy"])
            stats[f"router/layer{index}/max_load"] = float(s["load"].max())
        elif isinstance(layer, TokenMoE) and layer.deepspeed_moe.exp_counts is not None:
            counts = layer.deepspeed_moe.exp_counts.float()
            stats[f"router/layer{index}/max_load"] = float(counts.max() / counts.sum().clamp_min(1))
    return stats


@torch.no_grad()
def curvature_stats(model) -> dict:
    """Per CAMEx layer: mean relative distance of the Kronecker factors from identity."""
    stats = {}
    for index, layer in model.moe_layers():
        if not (isinstance(layer, CAMExMoE) and layer.args.curved):
            continue
        devs = []
        for expert in layer.local_experts:
            for factors in expert.curvature.values():
                for f in factors.tensors():
                    eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
                    devs.append(float((f - eye).norm() / eye.norm() / math.sqrt(f.shape[0])))
        stats[f"curvature/layer{index}/dev_from_identity"] = sum(devs) / len(devs)
    return stats


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
