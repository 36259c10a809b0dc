"""Issue 4: the main job end to end — multi-rank training, exact resume, two launchers, bad input."""
import json
import signal
import sys

import pytest

from tests import distributed
from tests.launch import run_checked, run_main

LAUNCHER = distributed.ROOT / "launcher" / "pretrain.py"
FAULTY = "tests.dist.faulty_pretrain"
TINY = {"d_model": 64, "n_layers": 2, "n_heads": 2, "ffn_hidden_size": 128, "seq_len": 64,
        "moe": {"method": "camex", "num_experts": 4, "every": 1, "segment_len": 16}}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def _losses(run_dir) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _args(tmp_path, cache, out, steps=40, extra=()):
    return ["--model_config", _write(tmp_path / "tiny.json", TINY), "--cache_dir", cache, "--output_dir", out,
            "--max_steps", steps, "--eval_interval", steps, "--save_interval", 20, "--log_interval", 1,
            "--no_progress", *extra]


@pytest.mark.slow
def test_two_ranks_expert_parallel_perplexity_falls(tmp_path, cache):
    small = dict(TINY, d_model=96, seq_len=128, moe=dict(TINY["moe"], segment_len=32))
    out = tmp_path / "run"
    distributed.deepspeed(LAUNCHER, "--model_config", _write(tmp_path / "m.json", small), "--cache_dir", cache,
                          "--output_dir", out, "--ep_size", 2, "--max_steps", 60, "--eval_interval", 20,
                          "--eval_batches", 3, "--save_interval", 60, "--no_progress")  # 3: ranks split unevenly
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ppl = [r["val_ppl"] for r in rows if "val_ppl" in r]
    from camex_ds.config import ModelConfig
    from camex_ds.analysis.flops import ep_bytes_per_step

    analytic = ep_bytes_per_step(ModelConfig.from_dict(dict(small, vocab_size=4096, moe=dict(small["moe"], ep_size=2))),
                                 8 * small["seq_len"], gloo=True)
    assert analytic > 0 and all(r["ep_bytes_sent_per_step"] == analytic for r in rows if "loss" in r)
    assert len(ppl) == 3 and ppl[0] > ppl[1] > ppl[2], ppl
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["val_ppl"] == ppl[-1]
    assert set(final) >= {"step", "train_loss", "val_loss", "val_ppl", "val_bpb", "tokens_per_s", "flops_per_token",
                          "mfu"}
    ckpt = out / "checkpoints" / "global_step60"
    assert (out / "checkpoints" / "latest").read_text() == "global_step60"
    assert len(list(ckpt.glob("layer_*_expert_*_model_states.pt"))) == 2 * 4  # 2 MoE layers x 4 experts
    assert list((out / "tensorboard").rglob("events.out.tfevents*")), "TensorBoard events via DeepSpeed's monitor"


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_losses(tmp_path, cache):
    full, stopped, killed = tmp_path / "full", tmp_path / "stopped", tmp_path / "killed"
    # in this process, but for the killed run, which must be a real process
    run_checked("pretrain", *_args(tmp_path, cache, full))
    run_checked("pretrain", *_args(tmp_path, cache, stopped, extra=["--stop_at_step", 20]))
    assert max(_losses(stopped)) == 20
    run_checked("pretrain", *_args(tmp_path, cache, stopped, extra=["--resume"]))

    # SIGKILL just before step 21, right after the step-20 checkpoint (injected by the test-side wrapper)
    proc = distributed.run([sys.executable, "-m", FAULTY, *map(str, _args(tmp_path, cache, killed))], check=False,
                           extra_env={"CAMEX_FAULT": "0:KILL:step:21"})
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "checkpoints" / "latest").read_text() == "global_step20"
    run_checked("pretrain", *_args(tmp_path, cache, killed, extra=["--resume"]))

    reference = _losses(full)
    for run in (stopped, killed):
        losses = _losses(run)
        assert sorted(losses) == list(range(1, 41))
        for step in range(21, 41):
            assert abs(losses[step] - reference[step]) <= 1e-4 * abs(reference[step]), (run.name, step)


@pytest.mark.slow
def test_two_launchers_on_loopback_match_one_launcher(tmp_path, cache):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    one, two = tmp_path / "one", tmp_path / "two"
    distributed.deepspeed(LAUNCHER, *_args(tmp_path, cache, one, steps=10))
    port = distributed.free_port()
    runner = [distributed.sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile, "--no_ssh",
              "--master_addr", "127.0.0.1", "--master_port", port]
    cmds = [runner + ["--node_rank", r, LAUNCHER, *_args(tmp_path, cache, two, steps=10)] for r in (0, 1)]
    procs = [distributed.subprocess.Popen([str(c) for c in cmd], cwd=distributed.ROOT, env=distributed.env(),
                                          stdout=distributed.subprocess.PIPE, stderr=distributed.subprocess.STDOUT,
                                          text=True) for cmd in cmds]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    assert json.loads((two / "final_metrics.json").read_text())["world_size"] == 2
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert all(abs(a[s] - b[s]) <= 1e-6 * abs(a[s]) for s in a)


@pytest.mark.parametrize("case", ["missing_data", "empty_corpus", "segment_len", "method", "ep_size", "resume",
                                  "megablocks_fp32"])
def test_bad_input_is_one_line(tmp_path, cache, case):
    model = dict(TINY)
    extra = []
    if case == "missing_data":
        extra = ["--data", tmp_path / "nope.txt"]
    elif case == "empty_corpus":
        (tmp_path / "corpus").mkdir()
        (tmp_path / "corpus" / "empty.txt").write_text("")
        extra = ["--data", tmp_path / "corpus"]
    elif case == "segment_len":
        model = dict(TINY, seq_len=72)
    elif case == "method":
        model = dict(TINY, moe=dict(TINY["moe"], method="camx"))
    elif case == "ep_size":
        extra = ["--ep_size", 3]
    elif case == "resume":
        extra = ["--resume"]
    elif case == "megablocks_fp32":  # the default DeepSpeed config trains in fp32
        model = dict(TINY, moe={"method": "smoe", "num_experts": 4, "every": 2, "backend": "megablocks"})
    args = ["--model_config", _write(tmp_path / "m.json", model), "--cache_dir", cache,
            "--output_dir", tmp_path / "out", "--max_steps", 2, "--no_progress", *extra]
    proc = run_main("pretrain", args)  # in this process: the real script's own run is test_help_explains_flags
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    expected = {"missing_data": "does not exist", "empty_corpus": "no documents", "segment_len": "seq_len=72",
                "method": "'camx'", "ep_size": "ep_size=3", "resume": "no checkpoint",
                "megablocks_fp32": "runs in bf16 only"}[case]
    assert err[-1].startswith("error: ") and expected in err[-1], err[-1]


def test_help_explains_flags():
    out = distributed.python(LAUNCHER, "--help").stdout
    for flag in ("--deepspeed_config", "--model_config", "--data", "--tokenizer", "--output_dir", "--max_steps",
                 "--eval_interval", "--save_interval", "--ep_size", "--resume", "--seed"):
        assert flag in out


@pytest.mark.slow
def test_init_from_an_upcycled_dense_model(tmp_path, cache):
    dense = dict(TINY, moe=None)
    run, cons, up = tmp_path / "dense", tmp_path / "dense_model", tmp_path / "moe_model"
    # the launcher and camex-convert in this process (their real scripts run in other tests)
    run_checked("pretrain", "--model_config", _write(tmp_path / "d.json", dense), "--cache_dir", cache,
                "--output_dir", run, "--max_steps", 20, "--eval_interval", 20, "--save_interval", 20,
                "--log_interval", 1, "--no_progress")
    run_checked("convert", "consolidate", "--checkpoint", run, "--output", cons)
    moe_cfg = _write(tmp_path / "m.json", {"moe": TINY["moe"]})
    run_checked("convert", "upcycle", "--input", cons, "--moe_config", moe_cfg, "--output", up)
    out = tmp_path / "moe_run"
    run_checked("pretrain", "--init_from", up, "--cache_dir", cache, "--output_dir", out, "--max_steps", 2,
                "--eval_interval", 2, "--save_interval", 2, "--log_interval", 1, "--no_progress")
    cfg = json.loads((out / "model_config.json").read_text())
    assert cfg["moe"]["method"] == "camex"
    first, dense_losses = _losses(out)[1], _losses(run)
    assert dense_losses[20] < dense_losses[1] - 0.5  # the dense model learned something...
    assert first < dense_losses[20] + 0.25  # ...and the MoE run starts from it, not from scratch
