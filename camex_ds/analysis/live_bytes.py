"""The peak bytes of the tensors a piece of CPU code creates and keeps alive, counted by storage, not by process RSS:
allocator caching hides nothing, and tensors made before (parameters, gradients, optimizer states) are left out.
`tools/bench_checkpointing.py` measures activation memory with it; the tests check what a merge plan keeps."""
from __future__ import annotations

import functools
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """The bytes of tensor storages created while it is active and still alive, and their peak: every op's outputs
    are seen (the backward's too, which runs on this thread for CPU tensors), and a storage's weak reference says
    when it is freed. Storages made before (parameters, gradients, AdamW's states) are not counted, nor views of
    them; a kernel's internal workspace, never handed out as a tensor, is not seen."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.refs = 0, 0, {}

    def _freed(self, key: int, nbytes: int, _ref) -> None:
        self.live -= nbytes
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view (or an in-place op's result) shares an input's storage: nothing was allocated
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.refs and key not in inputs:
                    nbytes = storage.nbytes()
                    self.refs[key] = weakref.ref(storage, functools.partial(self._freed, key, nbytes))
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out
