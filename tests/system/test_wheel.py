"""Issue 26: the package works from a wheel. The wheel holds the default model and DeepSpeed configs, and no
default of the package resolves against the checkout it was built from."""
import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from camex_ds.run_args import CONFIGS_DIR, DEFAULT_DEEPSPEED_CONFIG, DEFAULT_MODEL_CONFIG

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "camex_ds"


def test_wheel_holds_the_default_configs(tmp_path):
    """`pip wheel .` from a copy of the sources the wheel needs (the checkout stays free of build/ and egg-info),
    with this environment's setuptools: no download."""
    pytest.importorskip("setuptools.build_meta", reason="building the wheel offline needs setuptools installed")
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "camex_ds", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("camex_ds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in CONFIGS_DIR.rglob("*.json")}
    assert {"camex_ds/configs/cpu.json", "camex_ds/configs/models/camex_small.json"} <= shipped
    assert shipped <= names, sorted(shipped - names)
    assert "camex_ds/eval_tasks/camex_local_text.yaml" in names


def test_defaults_live_in_the_package():
    for path in (DEFAULT_MODEL_CONFIG, DEFAULT_DEEPSPEED_CONFIG):
        assert Path(path).is_file() and Path(path).is_relative_to(PACKAGE), path


def test_ds_configs_is_the_package_configs_folder():
    """The paths users and docs know (ds_configs/...) name the same files as the package data: one home."""
    assert (ROOT / "ds_configs").resolve() == CONFIGS_DIR
    assert (ROOT / "ds_configs" / "models" / "camex_small.json").read_bytes() == Path(DEFAULT_MODEL_CONFIG).read_bytes()


def test_no_package_module_reaches_above_the_package():
    """`Path(__file__).parents[k]` past the package (the checkout, or site-packages) is how a default came to
    resolve against the repository root: only train/checkpoint.py may name the folder that holds camex_ds."""
    reaching = []
    for path in sorted(PACKAGE.rglob("*.py")):
        depth = len(path.relative_to(PACKAGE).parts) - 1  # parents[depth] is camex_ds/
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and getattr(node.value, "attr", None) == "parents" \
                    and isinstance(node.slice, ast.Constant) and node.slice.value > depth:
                reaching.append(path.relative_to(ROOT).as_posix())
    assert reaching == ["camex_ds/train/checkpoint.py"], reaching
