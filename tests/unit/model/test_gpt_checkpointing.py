"""Activation checkpointing is exact: with every block (or every k-th) recomputed in the backward, one optimizer step
gives the losses and every gradient of the step without it, for each family and method, at accumulation 1 and 4 (the
step's merge plans built at its first micro-batch, as the trainer does); router noise and DARE masks replay, and the
recomputed forward reuses the step's plans instead of redoing their work. Through DeepSpeed, under expert
parallelism and ZeRO 2: tests/integration/test_checkpointing.py."""
import pytest
import torch

from camex_ds.config import ConfigError
from camex_ds.model import build_model
from camex_ds.moe import CAMExMoE

BASE = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=2, ffn_hidden_size=64, seq_len=32)
LLAMA = dict(BASE, architecture="llama", activation="swiglu", n_heads=4, n_kv_heads=2, norm_eps=1e-6)
BATCH, ACCUM = 8, 4


def _moe(method, **kw):
    return {"num_experts": 4, "every": 1, "segment_len": 8, "alpha": 0.5, "method": method, "curvature_rank": 2, **kw}


MODELS = {
    "dense": BASE,
    "smoe": dict(BASE, moe=_moe("smoe", backend="deepspeed")),
    "euclid": dict(BASE, moe=_moe("euclid")),
    "camex": dict(BASE, moe=_moe("camex")),
    "camex-ties": dict(BASE, moe=_moe("camex-ties")),
    "camex-dare": dict(BASE, moe=_moe("camex-dare")),
    "dynamic-camex": dict(BASE, moe=dict(_moe("camex", dynamic=True), num_experts=5)),
    "llama-camex": dict(LLAMA, moe=_moe("camex", every=2)),
}


def _model(name):
    torch.manual_seed(0)
    model = build_model(MODELS[name]).train()
    with torch.no_grad():  # curvature away from the identity, so that the curved path is exercised
        for n, p in model.named_parameters():
            if ".curvature." in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _batch():
    return torch.randint(0, 64, (BATCH, 33), generator=torch.Generator().manual_seed(1))


def optimizer_step(model, accum, interval=0):
    """One optimizer step's micro-batch losses and summed gradients, its plans built at the first micro-batch with
    the trainer's own calls (`merge_plans`, then `for_micro_batch`)."""
    model.set_activation_checkpointing(interval)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # router noise and DARE masks: the same draws in both runs
    losses, plans = [], None
    for i, micro in enumerate(_batch().chunk(accum)):
        if plans is None:
            plans = model.merge_plans(micro.shape[0], micro.shape[1] - 1, accum)
        out = model(micro[:, :-1], labels=micro[:, 1:], plans=plans.for_micro_batch(i == accum - 1))
        (out.loss + out.aux_loss).backward()
        losses.append(out.loss.detach())
    return torch.stack(losses), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_exact(got, want, tol=1e-5):
    (loss_got, grads_got), (loss_want, grads_want) = got, want
    assert ((loss_got - loss_want).abs() / loss_want.abs()).max().item() < tol
    assert set(grads_got) == set(grads_want)
    err = {n: ((grads_got[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in grads_want.items()}
    worst = max(err, key=err.get)
    assert err[worst] < tol, f"{worst}: rel err {err[worst]:.2e}"


@pytest.mark.parametrize("accum", [1, ACCUM])
@pytest.mark.parametrize("name", list(MODELS))
def test_checkpointed_step_equals_the_step_without(name, accum, single_thread):
    model = _model(name)
    assert_exact(optimizer_step(model, accum, interval=1), optimizer_step(model, accum))


@pytest.mark.parametrize("name", ["camex", "dynamic-camex"])
def test_checkpointed_bf16_step_equals_the_step_without(name, single_thread):
    """The recomputed forward runs the same bf16 kernels on the same inputs: its saved tensors are the first's."""
    model = _model(name).to(torch.bfloat16)
    assert_exact(optimizer_step(model, ACCUM, interval=1), optimizer_step(model, ACCUM))


def test_every_kth_block_is_recomputed_and_only_with_gradients(single_thread):
    model = _model("camex")
    calls = [0] * len(model.blocks)

    def counted(i, forward):
        def run(*args):
            calls[i] += 1
            return forward(*args)
        return run

    for i, block in enumerate(model.blocks):  # (the recomputation calls forward without the module's hooks)
        block.forward = counted(i, block.forward)
    ids = _batch()[:2]
    for interval, want in [(0, [1, 1, 1]), (1, [2, 2, 2]), (2, [1, 2, 1]), (3, [1, 1, 2])]:
        calls[:] = [0] * len(calls)
        model.set_activation_checkpointing(interval)
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        assert calls == want, (interval, calls)
    calls[:] = [0] * len(calls)
    with torch.no_grad():  # evaluation: nothing to recompute
        model(ids[:, :-1])
    assert calls == [1, 1, 1]


def test_recomputed_forward_reuses_the_steps_plans(monkeypatch, single_thread):
    """The curvature work and its collectives are the plans' (built once per step), never the recomputed block's."""
    model = _model("dynamic-camex")
    built = []
    plan = CAMExMoE.plan
    monkeypatch.setattr(CAMExMoE, "plan", lambda self, *a, **kw: built.append(self) or plan(self, *a, **kw))
    optimizer_step(model, ACCUM, interval=1)
    assert len(built) == len(model.moe_layers())


@pytest.mark.parametrize("interval", [-1, 1.5, True, "2", 4])
def test_a_bad_interval_is_refused(interval):
    with pytest.raises(ConfigError, match=r"^activation_checkpointing_interval=.* is invalid: expected an integer in "
                                          r"0..n_layers=3"):
        _model("dense").set_activation_checkpointing(interval)


@pytest.mark.parametrize("interval", [0, 1])
@pytest.mark.parametrize("name", ["camex", "dynamic-camex"])
def test_each_plans_backward_runs_right_after_its_blocks(name, interval, single_thread):
    """Each merge plan is built just before its block, so its backward (into the experts and curvature factors) runs
    before the previous block's: one layer's plan gradients are alive at a time, not every layer's until the end."""
    model = _model(name)
    model.set_activation_checkpointing(interval)
    order = []
    for i, block in enumerate(model.blocks):
        for part, module in (("attn", block.attn), ("plan", block.ffn.local_experts)):
            for p in module.parameters():
                p.register_post_accumulate_grad_hook(lambda _, key=(part, i): order.append(key))
    ids = _batch()[:2]
    out = model(ids[:, :-1], labels=ids[:, 1:])
    (out.loss + out.aux_loss).backward()
    first = list(dict.fromkeys(order))
    assert first == [(part, i) for i in reversed(range(len(model.blocks))) for part in ("attn", "plan")], first
