"""Issue 3: CAMEx experts and curvature factors sharded over expert-parallel ranks match one process.

One 2-rank DeepSpeed job (two rank processes, no launcher: `distributed.ranks`) runs one optimizer step
for ep_size=2 and for ep_size=1 with DP=2, under ZeRO 0, 1 and 2, for camex-ties and euclid, with
curvature factors away from identity; one plain process runs the same step on the concatenated batch. The
ep_size=2 checkpoints are then loaded into ep_size=1 models. Config notes (tests/dist/ep_step.py): aux loss
off (its cv² is not additive over ranks) and alpha=0.5 (with alpha=1 and full soft merging the euclid base
cancels out of W exactly, its gradient is rounding noise, and Adam's first step turns noise into ±lr).
"""
import pytest
import torch

from camex_ds.moe.comm import ep_bytes_per_layer as ep_bytes_per_step

from tests import distributed
from tests.launch import run_main

pytestmark = pytest.mark.slow
SCRIPT = "tests.dist.ep_step"
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    (out / "ck").mkdir()
    distributed.ranks_ok(SCRIPT, "--out", out, "--layouts", "ep2,dp2", "--ckpt", out / "ck")
    distributed.python(SCRIPT, "--out", out, "--layouts", "ref,load", "--ckpt", out / "ck")

    def merged(layout):
        parts = [torch.load(out / f"{layout}_rank{r}.pt") for r in range(2 if layout in ("ep2", "dp2") else 1)]
        return {k: {n: {**parts[-1][k][n], **parts[0][k][n]} for n in parts[0][k] if n in ("before", "after")} for k in parts[0]}

    return {layout: merged(layout) for layout in ("ref", "ep2", "dp2", "load")}


def _max_rel(a: dict, b: dict) -> tuple[float, str]:
    assert set(a) == set(b), f"different parameter sets: {set(a) ^ set(b)}"
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b), \
        max(b, key=lambda n: ((a[n] - b[n]).norm() / b[n].norm()).item())


@pytest.mark.parametrize("layout", ["ep2", "dp2"])
@pytest.mark.parametrize("method", ["camex-ties", "euclid"])
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_one_step_matches_single_process(results, layout, method, zero):
    key = f"{method}-zero{zero}"
    ref, got = results["ref"][key], results[layout][key]
    assert _max_rel(got["before"], ref["before"])[0] == 0.0, "layouts must start from the same model"
    if method.startswith("camex"):
        eye_dev = max((p - torch.eye(p.shape[-1])).abs().max().item()
                      for n, p in ref["before"].items() if ".curvature." in n)
        assert eye_dev > 0.05, "curvature factors must be away from identity"
    moved = max(((ref["after"][n] - ref["before"][n]).norm() / ref["before"][n].norm()).item() for n in ref["after"])
    assert moved > 1e-3, "the step must change the parameters"
    err, name = _max_rel(got["after"], ref["after"])
    assert err < REL_TOL, f"{layout} {key}: parameter {name} differs by rel {err:.2e}"


@pytest.mark.parametrize("method", ["camex-ties", "euclid"])
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_ep2_checkpoint_loads_into_ep1(results, method, zero):
    key = f"{method}-zero{zero}"
    saved, loaded = results["ep2"][key]["after"], results["load"][key]["after"]
    err, name = _max_rel(loaded, saved)
    assert err == 0.0, f"{key}: {name} differs after ep2 -> ep1 load (rel {err:.2e})"
    assert any(".curvature." in n for n in loaded) == method.startswith("camex")


def test_bf16_runs_under_expert_parallelism(tmp_path):
    distributed.ranks_ok(SCRIPT, "--out", tmp_path, "--layouts", "ep2", "--zero", "2", "--bf16", "--methods", "camex")
    for rank in range(2):
        after = torch.load(tmp_path / f"ep2_rank{rank}.pt")["camex-zero2"]["after"]
        assert all(torch.isfinite(v).all() for v in after.values())


def test_zero3_is_a_clear_error(tmp_path):
    import json

    cfg = json.loads((distributed.ROOT / "ds_configs" / "cpu.json").read_text())
    cfg["zero_optimization"] = {"stage": 3}
    (tmp_path / "z3.json").write_text(json.dumps(cfg))
    proc = run_main("pretrain", ["--deepspeed_config", tmp_path / "z3.json", "--output_dir", tmp_path / "run"])
    assert proc.returncode == 2
    assert "zero_optimization.stage=3" in proc.stderr and "Traceback" not in proc.stderr


def test_communication_accounting():
    shapes = {"w_in": (64, 32), "w_out": (32, 64)}
    p = 2 * 64 * 32
    assert ep_bytes_per_step(num_experts=4, ep_size=1, matrix_shapes=shapes)["total"] == 0
    b = ep_bytes_per_step(num_experts=4, ep_size=2, matrix_shapes=shapes)
    assert b["forward"] == b["backward"] == int(0.5 * 4 * p * 4)  # (ep-1)/ep · N · P elements, fp32
    ties = ep_bytes_per_step(num_experts=4, ep_size=2, matrix_shapes=shapes, mask="ties")
    assert ties["forward"] == b["forward"] + int(2 * 0.5 * p * 4)
