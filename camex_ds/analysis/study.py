"""Issue 24's question, "does curvature help?", asked with the paper's own protocol in one resumable command
(`camex-study`): three compare grids under one output folder and one report.

1. `pretrain/`: a dense model pretrained on the base corpus (default: this Python's standard-library sources),
   then consolidated into `dense_model/`.
2. `finetune/`: the paper's GPT-2 protocol on a second corpus: the dense model fine-tuned as it is (`dense`) and
   upcycled into every merging method (7 experts, curvature rank 8, 4 segments per sequence as 256 of GPT-2's 1024
   tokens), fine-tuned at a low learning rate and evaluated on the corpus's held-out text; the arms sweep the
   curvature's learning-rate scale (where `MoEConfig` has `curvature_lr_scale`) and rank, the first arm being
   the reference settings.
3. `scratch/`: the same five methods trained from scratch on the second corpus at the default MoE settings.
4. `scratch_scaled/`: the curvature-aware methods and their Euclidean twins from scratch again, at the fine-tuning
   sweep's largest curvature learning-rate scale, so a setting that wins in stage 2 is tried in both protocols.

The second corpus defaults to English prose that needs no network: the docstrings of this Python's standard
library (`camex_ds.data.prose`), a change of domain from the code the base model learned.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ..config import DEFAULT_VOCAB_SIZE, MoEConfig
from ..run_args import DEFAULT_DEEPSPEED_CONFIG, default_model
from .arms import format_value, parse_sweeps
from .grid import UsageError, build_method_config, step_batch, write_grid_report
from .options import GridOptions, load_json, make_grid, variant_configs
from .report import results_markdown
from .results import json_safe, write_json
from .supervise import run_grid

STUDY_METHODS = ("dense", "euclid", "ties", "camex", "camex-ties")
#: The paper's GPT-2 fine-tuning (CAMEx, ICLR 2025): 7 experts, curvature rank 8, segments of 256 of 1024 tokens.
REFERENCE_MOE = {"num_experts": 7, "curvature_rank": 8}
SEGMENTS_PER_SEQUENCE = 4
#: The arms of the fine-tuning grid, first values first: the first arm is the reference (scale 1, rank 8); --quick
#: keeps both axes with one value fewer, which exercises every path at 4 runs fewer.
SWEEPS = (("curvature_lr_scale", (1, 10, 100)), ("curvature_rank", (8, 1)))
QUICK_SWEEPS = (("curvature_lr_scale", (1, 100)), ("curvature_rank", (8, 1)))
#: Each stage's steps, by the plan's key.
STAGE_STEPS = {"pretrain": "pretrain_steps", "finetune": "finetune_steps", "scratch": "scratch_steps",
               "scratch_scaled": "scratch_steps"}
#: Stage 4's methods: each curvature-aware method with its twin.
SCALED_METHODS = ("euclid", "ties", "camex", "camex-ties")
#: The default model trains ~8000 tokens/s on 2 quiet CPU cores (docs/benchmarks.md); other models scale by FLOPs.
REFERENCE_TOKENS_PER_S = 8000.0
#: Seconds a launcher run spends outside its steps: interpreter, DeepSpeed, data, checkpoint (2 quiet cores).
RUN_OVERHEAD_S = 10.0
#: Validation windows at most per evaluation: the whole held-out text up to this.
EVAL_WINDOWS_CAP = 512
#: Validation windows of the pretraining's evaluations (its held-out 5% is larger).
PRETRAIN_EVAL_WINDOWS = 128
#: The time estimate's guess at the second corpus's held-out windows: the docstrings' are 112 windows of 257
#: tokens under the base model's code tokenizer, 104 under their own.
HELD_OUT_WINDOWS_GUESS = 112
EVALS_PER_RUN = 5
TINY_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden_size": 64, "seq_len": 32}
#: The two plans: the full study (about 2 hours on 2 CPU cores) and --quick (every stage and arm, 2-3 steps).
PLANS = {
    "full": {"seeds": 5, "sweep_seeds": 3, "pretrain_steps": 1200, "finetune_steps": 150, "scratch_steps": 200,
             "finetune_lr": 3e-4, "vocab_size": DEFAULT_VOCAB_SIZE, "bootstrap_resamples": 10_000,
             "eval_cap": EVAL_WINDOWS_CAP},
    "quick": {"seeds": 1, "sweep_seeds": 1, "pretrain_steps": 3, "finetune_steps": 2, "scratch_steps": 2,
              "finetune_lr": 3e-4, "vocab_size": 512, "bootstrap_resamples": 500, "eval_cap": 16},
}
PROG = "curvature_study.py"


@dataclass
class StudySettings:
    """What `camex-study` takes; a None number comes from the plan (`PLANS`, full or quick)."""

    output: str = "runs/curvature_study"
    quick: bool = False
    seeds: Optional[int] = None
    sweep_seeds: Optional[int] = None
    pretrain_steps: Optional[int] = None
    finetune_steps: Optional[int] = None
    scratch_steps: Optional[int] = None
    finetune_lr: Optional[float] = None
    base_data: Optional[str] = None
    data: Optional[str] = None
    val_data: Optional[str] = None
    progress: bool = True
    plan_only: bool = False


@dataclass
class Plan:
    """The study's concrete settings, its arms and its time estimate (seconds per stage)."""

    settings: StudySettings
    output: Path
    numbers: Dict[str, object]
    model: dict
    moe: Dict[str, object]
    sweeps: List[str]
    notes: List[str] = field(default_factory=list)
    runs: Dict[str, int] = field(default_factory=dict)
    reference_variants: List[str] = field(default_factory=list)
    estimate_s: Dict[str, float] = field(default_factory=dict)


def make_plan(s: StudySettings) -> Plan:
    """Validate `s` and fill in the plan (raises UsageError)."""
    numbers = dict(PLANS["quick" if s.quick else "full"])
    for key in ("seeds", "sweep_seeds", "pretrain_steps", "finetune_steps", "scratch_steps", "finetune_lr"):
        value = getattr(s, key)
        if value is not None:
            if not value > 0:
                raise UsageError(f"--{key} must be > 0, got {value}")
            numbers[key] = value
    numbers["sweep_seeds"] = min(numbers["sweep_seeds"], numbers["seeds"])  # the first seeds of the reference's
    if (s.data is None) != (s.val_data is None):
        raise UsageError("--data and --val_data go together: the second corpus's training and held-out text")
    model = dict(default_model(), **(TINY_MODEL if s.quick else {}))
    seq_len = model["seq_len"]
    model["moe"] = dict(model["moe"], segment_len=seq_len // SEGMENTS_PER_SEQUENCE)
    moe = dict(REFERENCE_MOE, segment_len=seq_len // SEGMENTS_PER_SEQUENCE)
    known = {f.name for f in dataclasses.fields(MoEConfig)}
    sweeps, notes = [], []
    for key, values in (QUICK_SWEEPS if s.quick else SWEEPS):
        if key in known:
            sweeps.append(f"{key}={','.join(format_value(v) for v in values)}")
        else:
            notes.append(f"MoEConfig has no {key!r} in this checkout: its sweep is left out")
    plan = Plan(s, Path(s.output).resolve(), numbers, model, moe, sweeps, notes)
    _, arm_variants, _ = _finetune_variants(plan)
    plan.reference_variants = list(next(iter(arm_variants.values())).values())
    _estimate(plan)
    return plan


def _stage_variants(plan: Plan) -> Dict[str, Dict[str, dict]]:
    """The distinct model configs each stage trains, by variant (dims: the plan's model)."""
    dense = dict(plan.model, moe=None, vocab_size=plan.numbers["vocab_size"])
    base = dict(plan.model, vocab_size=plan.numbers["vocab_size"])
    return {
        "pretrain": {"dense": dense},
        "finetune": _finetune_variants(plan)[2],
        "scratch": {m: build_method_config(base, m) for m in STUDY_METHODS},
        "scratch_scaled": {m: build_method_config(base, m) for m in SCALED_METHODS},
    }


def scaled_setting(plan: Plan) -> Optional[str]:
    """Stage 4's `--moe_set`: the largest curvature learning-rate scale of the fine-tuning sweep (None without
    that sweep)."""
    values = dict(QUICK_SWEEPS if plan.settings.quick else SWEEPS).get("curvature_lr_scale")
    return None if values is None or not any(s.startswith("curvature_lr_scale=") for s in plan.sweeps) else \
        f"curvature_lr_scale={format_value(max(values))}"


def _finetune_variants(plan: Plan):
    return variant_configs(list(STUDY_METHODS), dict(plan.model, moe=None, vocab_size=plan.numbers["vocab_size"]),
                           plan.moe, parse_sweeps(plan.sweeps))


def _estimate(plan: Plan) -> None:
    """Runs and seconds per stage: steps at `REFERENCE_TOKENS_PER_S` scaled by each config's training FLOPs per
    token against the default model's, the evaluations at a third of that cost, `RUN_OVERHEAD_S` per run."""
    from .flops import flops_per_token  # torch loads here, not for --help

    batch = step_batch(load_json(DEFAULT_DEEPSPEED_CONFIG, "the default DeepSpeed config"), 1, "ds_configs/cpu.json")

    def fpt(cfg):
        return flops_per_token(cfg, cfg["seq_len"], batch.micro * cfg["seq_len"], accumulation=batch.accumulation,
                               vocab_size=cfg.get("vocab_size") or DEFAULT_VOCAB_SIZE)["train"]

    reference = fpt(default_model())
    n = plan.numbers
    for stage, configs in _stage_variants(plan).items():
        steps = n[STAGE_STEPS[stage]]
        windows = min(n["eval_cap"], PRETRAIN_EVAL_WINDOWS if stage == "pretrain" else HELD_OUT_WINDOWS_GUESS)
        runs, total = 0, 0.0
        for name, cfg in configs.items():
            seeds = _seeds_of(plan, stage, name)
            tokens = steps * batch.tokens(cfg["seq_len"]) + EVALS_PER_RUN * windows * cfg["seq_len"] / 3
            total += seeds * (RUN_OVERHEAD_S + tokens / (REFERENCE_TOKENS_PER_S * reference / fpt(cfg)))
            runs += seeds
        plan.runs[stage] = runs
        plan.estimate_s[stage] = total


def _seeds_of(plan: Plan, stage: str, variant: str) -> int:
    """Seeds a variant of a stage trains: one pretraining; every seed for the fine-tuning's reference arm and the
    from-scratch methods; `sweep_seeds` for a fine-tuning variant that only the sweep's other arms train, and for
    stage 4."""
    n = plan.numbers
    if stage == "pretrain":
        return 1
    if stage == "scratch_scaled" or (stage == "finetune" and variant not in plan.reference_variants):
        return n["sweep_seeds"]
    return n["seeds"]


def plan_lines(plan: Plan) -> List[str]:
    n, s = plan.numbers, plan.settings
    total = sum(plan.estimate_s.values())
    lines = [f"curvature study ({'quick' if s.quick else 'full'}) in {plan.output}",
             f"  model: d_model {plan.model['d_model']}, {plan.model['n_layers']} layers, seq_len "
             f"{plan.model['seq_len']}; seeds {n['seeds']} (the sweep's other arms: "
             f"{n['sweep_seeds']}); fine-tuning lr {n['finetune_lr']}",
             f"  base corpus: {s.base_data or 'the default corpus (standard-library sources)'}; second corpus: "
             f"{s.data or 'standard-library docstrings (prose)'}",
             f"  upcycled MoE: {json.dumps(plan.moe)}; arms: {' x '.join(plan.sweeps) or 'one'}"]
    for stage in STAGE_STEPS:
        lines.append(f"  {stage:14s} {plan.runs[stage]:3d} runs x {n[STAGE_STEPS[stage]]} steps   "
                     f"~{plan.estimate_s[stage] / 60:.0f} min")
    lines.append(f"  estimated total ~{total / 60:.0f} min at {REFERENCE_TOKENS_PER_S:.0f} tokens/s for the default "
                 f"model (2 quiet CPU cores) + {RUN_OVERHEAD_S:.0f} s per run")
    return lines + [f"  note: {note}" for note in plan.notes]


class StudyLog:
    """The study's progress lines: printed, and kept in `study.log` beside the report."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def say(self, *lines: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as fh:
            for line in lines:
                print(line, flush=True)
                fh.write(f"{stamp} {line}\n")


def eval_windows_for(data: str, val_data: str, tokenizer: Optional[Path], seq_len: int, vocab_size: int,
                     cap: int) -> int:
    """Validation windows that cover the held-out text (up to `cap`), prepared as the launcher will (same cache)."""
    from ..data import cache_dir, prepare_data

    cache = cache_dir(None)
    prepared = prepare_data(data, tokenizer, cache, vocab_size=vocab_size, progress=False, val_percent=0)
    held = prepare_data(val_data, prepared.tokenizer_path, cache, progress=False, val_percent=100)
    windows = held.split("validation").num_windows(seq_len)
    if windows < 1:
        raise UsageError(f"--val_data {val_data!r} holds no window of {seq_len + 1} tokens: give more held-out text")
    return min(cap, windows)


def _stage(name: str, options: GridOptions, plan: Plan, log: StudyLog) -> Optional[dict]:
    """Run one stage's grid and write its report; its `write_report` paths, or None when a run failed."""
    t0 = time.time()
    log.say(f"== {name}: {plan.runs[name]} runs, estimated ~{plan.estimate_s[name] / 60:.0f} min")
    grid = make_grid(options)
    if run_grid(grid, PROG, progress=plan.settings.progress) != 0:
        return None
    paths = write_grid_report(grid, plan.numbers["bootstrap_resamples"], "minmax")
    log.say(f"== {name}: done in {(time.time() - t0) / 60:.1f} min; report {paths['md']}")
    return paths


def run_study(settings: StudySettings) -> int:
    """The whole study (module docstring); 0, or 1 when a run failed (rerun the same command to resume)."""
    plan = make_plan(settings)
    out, n = plan.output, plan.numbers
    log = StudyLog(out / "study.log")
    log.say(*plan_lines(plan))
    if settings.plan_only:
        return 0
    started = time.time()
    configs = out / "configs"
    write_json(configs / "base_model.json", plan.model)
    ds = load_json(DEFAULT_DEEPSPEED_CONFIG, "the default DeepSpeed config")
    ds["optimizer"]["params"]["lr"] = n["finetune_lr"]
    write_json(configs / "finetune_ds.json", ds)
    if settings.data is None:
        from ..data.prose import write_prose_corpus

        train, valid = (str(p) for p in write_prose_corpus(out / "prose", train_bytes=10 ** 9, valid_bytes=10 ** 9))
    else:
        train, valid = settings.data, settings.val_data
    vocab = ["--vocab_size", str(n["vocab_size"])]

    reports = {}
    reports["pretrain"] = _stage("pretrain", GridOptions(
        output=str(out / "pretrain"), methods="dense", seeds=1, max_steps=n["pretrain_steps"],
        model_config=str(configs / "base_model.json"), data=settings.base_data,
        eval_interval=max(1, n["pretrain_steps"] // EVALS_PER_RUN),
        eval_windows=min(n["eval_cap"], PRETRAIN_EVAL_WINDOWS),
        extra_args=vocab), plan, log)
    if reports["pretrain"] is None:
        return 1
    dense = out / "dense_model"
    if not dense.is_dir():
        from ..ckpt.convert import consolidate

        consolidate(out / "pretrain" / "runs" / "dense" / "seed0", dense)
        log.say(f"consolidated the pretrained dense model into {dense}")
    seq_len = plan.model["seq_len"]
    from ..ckpt.format import find_tokenizer

    tokenizer = find_tokenizer(dense)
    reports["finetune"] = _stage("finetune", GridOptions(
        output=str(out / "finetune"), methods=",".join(STUDY_METHODS), seeds=n["seeds"],
        max_steps=n["finetune_steps"], init_from=str(dense), data=train, val_data=valid,
        moe_set=[f"{k}={format_value(v)}" for k, v in plan.moe.items()], sweep=plan.sweeps,
        deepspeed_config=str(configs / "finetune_ds.json"), seed_data_order=True,
        eval_interval=max(1, n["finetune_steps"] // EVALS_PER_RUN),
        arm_seeds=n["sweep_seeds"],
        eval_windows=eval_windows_for(train, valid, tokenizer, seq_len, n["vocab_size"], n["eval_cap"])),
        plan, log)
    if reports["finetune"] is None:
        return 1
    reports["scratch"] = _stage("scratch", GridOptions(
        output=str(out / "scratch"), methods=",".join(STUDY_METHODS), seeds=n["seeds"],
        max_steps=n["scratch_steps"], model_config=str(configs / "base_model.json"), data=train, val_data=valid,
        eval_interval=max(1, n["scratch_steps"] // EVALS_PER_RUN),
        eval_windows=eval_windows_for(train, valid, None, seq_len, n["vocab_size"], n["eval_cap"]),
        extra_args=vocab), plan, log)
    if reports["scratch"] is None:
        return 1
    scaled = scaled_setting(plan)
    if scaled is not None:
        reports["scratch_scaled"] = _stage("scratch_scaled", GridOptions(
            output=str(out / "scratch_scaled"), methods=",".join(SCALED_METHODS),
            seeds=n["sweep_seeds"], max_steps=n["scratch_steps"],
            model_config=str(configs / "base_model.json"), data=train, val_data=valid,
            moe_set=[scaled], eval_interval=max(1, n["scratch_steps"] // EVALS_PER_RUN),
            eval_windows=eval_windows_for(train, valid, None, seq_len, n["vocab_size"], n["eval_cap"]),
            extra_args=vocab), plan, log)
        if reports["scratch_scaled"] is None:
            return 1
    elapsed = time.time() - started
    md, js = write_study_report(plan, reports, elapsed)
    log.say(f"study done in {elapsed / 60:.1f} min (estimated {sum(plan.estimate_s.values()) / 60:.0f}); "
            f"wrote {md} and {js}")
    return 0


STAGE_TITLES = {
    "pretrain": "Stage 1: the dense base, pretrained on the base corpus",
    "finetune": "Stage 2: upcycled fine-tuning on the second corpus (the paper's protocol)",
    "scratch": "Stage 3: the same methods from scratch on the second corpus",
    "scratch_scaled": "Stage 4: from scratch again, at the fine-tuning sweep's largest curvature learning-rate scale",
}


def write_study_report(plan: Plan, reports: Dict[str, dict], elapsed_s: float) -> tuple:
    """`report.md` (the plan, then each stage's tables and figures) and `results.json` in the study's folder."""
    out = plan.output
    lines = ["# Curvature study (issue 24)", "", *(f"    {line}" for line in plan_lines(plan)), "",
             f"Measured: {elapsed_s / 60:.1f} min for this invocation on this machine (a resumed study counts only "
             "the stages it ran; study.log has each stage's time).", "",
             "In stage 2 the first arm is the reference settings (curvature learning-rate scale 1, rank 8). Each "
             "stage's own results.md, results.json, figures and run logs (runs/<variant>/seed<k>/log.txt) are in "
             "its folder.", ""]
    for stage, paths in reports.items():
        links = {label: {k: f"{stage}/{v}" if v else None for k, v in fig.items()}
                 for label, fig in paths["links"].items()}
        lines += results_markdown(paths["results"], level=2, figures=links, title=STAGE_TITLES[stage])
    md = out / "report.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    payload = {"plan": {"numbers": plan.numbers, "model": plan.model, "moe": plan.moe, "sweeps": plan.sweeps,
                        "runs": plan.runs, "estimate_s": plan.estimate_s, "notes": plan.notes,
                        "settings": dataclasses.asdict(plan.settings)},
               "elapsed_s": elapsed_s, **{stage: paths["results"] for stage, paths in reports.items()}}
    return md, write_json(out / "results.json", json_safe(payload))
