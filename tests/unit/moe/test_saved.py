"""A tensor saved as recomputed: autograd keeps its rebuild, not the tensor (`camex_ds.moe.saved`)."""
import torch

from camex_ds.moe.saved import saved_as_recomputed


def test_a_tensor_saved_as_recomputed_is_rebuilt_in_the_backward():
    """Autograd keeps the rebuild instead of the tensor, and the gradient is the same."""
    w, base = torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(3, 4, dtype=torch.float64)
    rebuilt = []
    t = w - base
    with saved_as_recomputed(t, lambda: rebuilt.append(1) or (w - base)):
        y = (t * t).sum()
    assert not rebuilt
    y.backward()
    assert rebuilt
    torch.testing.assert_close(w.grad, 2 * (w - base).detach(), rtol=0, atol=0)
