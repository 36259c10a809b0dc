"""The `smoe` baselines: DeepSpeed's token-level MoE on any device; MegaBlocks dMoE only where CUDA and the
package are present (a clear error elsewhere; the GPU test skips without them)."""
import pytest
import torch

from camex_ds.config import MoEConfig
from camex_ds.model import build_model
from camex_ds.moe import token_moe
from camex_ds.moe.token_moe import MegaBlocksMoE, TokenMoE, megablocks_available, resolve_backend


def _cfg(backend: str) -> dict:
    return {"vocab_size": 64, "d_model": 16, "n_layers": 2, "n_heads": 2, "ffn_hidden_size": 32, "seq_len": 16,
            "moe": {"method": "smoe", "num_experts": 4, "top_k": 2, "every": 2, "segment_len": 8,
                    "backend": backend}}


def _moe_layers(model):
    return [b.ffn for b in model.blocks if b.is_moe]


def test_auto_backend_without_cuda_uses_deepspeed_moe():
    if megablocks_available():
        pytest.skip("CUDA and megablocks are present: 'auto' picks MegaBlocks")
    model = build_model(_cfg("auto"))
    assert [type(m) for m in _moe_layers(model)] == [TokenMoE]
    ids = torch.randint(0, 64, (2, 16))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.aux_loss > 0


def test_auto_backend_picks_megablocks_only_where_it_runs(monkeypatch):
    """'auto' -> MegaBlocks only with CUDA + the package, ep_size 1 and bf16 (its grouped GEMM is bf16-only)."""
    monkeypatch.setattr(token_moe, "megablocks_available", lambda: True)
    assert resolve_backend("auto", 1, bf16=True) == "megablocks"
    assert resolve_backend("auto", 1, bf16=False) == "deepspeed"
    assert resolve_backend("auto", 2, bf16=True) == "deepspeed"
    assert resolve_backend("deepspeed", 1, bf16=True) == "deepspeed"
    monkeypatch.setattr(token_moe, "megablocks_available", lambda: False)
    assert resolve_backend("auto", 1, bf16=True) == "deepspeed"


def test_megablocks_backend_without_cuda_is_a_clear_error():
    if megablocks_available():
        pytest.skip("CUDA and megablocks are present")
    with pytest.raises(RuntimeError, match=r"backend='megablocks' needs CUDA and the `megablocks` package"):
        build_model(_cfg("megablocks"))


@pytest.mark.gpu
@pytest.mark.skipif(not megablocks_available(), reason="needs CUDA and the megablocks package (the gpu extra)")
def test_megablocks_dmoe_trains_on_gpu():
    """bf16, as DeepSpeed's bf16 mode runs it (MegaBlocks' grouped GEMM is bf16-only); fp32 is a clear error."""
    torch.manual_seed(0)
    layer = MegaBlocksMoE(64, 128, MoEConfig(num_experts=4, method="smoe", top_k=2), bf16=True).cuda()
    x = torch.randn(2, 32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, aux, _, _ = layer(x)
    (out.float().square().mean() + aux).backward()
    assert out.shape == x.shape and out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert x.grad is not None and aux > 0
    with pytest.raises(TypeError, match=r"backend='megablocks' runs in bfloat16 only.*got torch.float32"):
        layer.float()(x.float())
