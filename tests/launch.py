"""Helpers for the robustness tests: plain text nobody here wrote, and the launcher run inside the test process.

`text_corpus` writes the docstrings of this Python's standard library (English prose, as a public corpus
would ship it) into a train.txt and a valid.txt: paragraphs separated by blank lines, no other structure.
`launch(argv)` runs `launcher/pretrain.py`'s `main(argv)` (camex_ds.cli.pretrain) in this process and returns
its exit code and what it printed: a job costs ~0.5 s instead of a new interpreter's ~5 s, which is what makes
hundreds of runs affordable. The process environment and signal handlers are left as they were. `write_json` and
`tiny_ds_config` write the configs such runs take.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "launcher" / "pretrain.py"
TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden_size": 64, "seq_len": 32,
        "moe": {"method": "camex", "num_experts": 4, "every": 1, "segment_len": 16}}
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def text_corpus(folder: Path, train_bytes: int = 300_000, valid_bytes: int = 40_000) -> tuple[Path, Path]:
    """`(train.txt, valid.txt)`: stdlib docstrings of 200+ characters, every 8th one to validation."""
    folder.mkdir(parents=True, exist_ok=True)
    train, valid, sizes = [], [], [0, 0]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    which = int((len(train) + len(valid)) % 8 == 7)
                    (valid if which else train).append(doc)
                    sizes[which] += len(doc)
        if sizes[0] >= train_bytes and sizes[1] >= valid_bytes:
            break
    (folder / "train.txt").write_text("\n\n".join(train) + "\n")
    (folder / "valid.txt").write_text("\n\n".join(valid) + "\n")
    return folder / "train.txt", folder / "valid.txt"


def write_json(path: Path, obj) -> Path:
    """`obj` written to `path` as JSON (a run's model or DeepSpeed config); returns `path`."""
    path.write_text(json.dumps(obj))
    return path


def tiny_ds_config(path: Path, stage=0, accum=1, micro=2) -> Path:
    """The DeepSpeed config of the tiny in-process runs, written to `path`: AdamW, ZeRO `stage`, no scheduler, fp32,
    no TensorBoard."""
    return write_json(path, {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
                             "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
                             "bf16": {"enabled": False},
                             "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "torch_adam": True}},
                             "tensorboard": {"enabled": False}})


def launch(argv) -> tuple[int, str, str]:
    """`(exit code, stderr, stdout)` of `launcher/pretrain.py ARGV`, run in this process."""
    from camex_ds.cli import pretrain

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = pretrain.main([str(a) for a in argv])
            except SystemExit as e:  # argparse
                code = e.code
    finally:
        for k, v in saved.items():  # init_distributed fills these in for a world of one
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, err.getvalue(), out.getvalue()


def error_lines(stderr: str) -> list:
    """The lines of a run's stderr that report an error (ours start `error:`, argparse's `PROG: error:`)."""
    return [line for line in stderr.splitlines() if line.startswith("error:") or ": error:" in line]


def one_error(result, code: int, *needles: str) -> str:
    """`launch`'s `result` failed with `code` and one error line containing every needle, and no traceback."""
    got, err, _ = result
    lines = error_lines(err)
    assert got == code and len(lines) == 1 and "Traceback" not in err, (got, err[-3000:])
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]
