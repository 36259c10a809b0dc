"""Shared test setup: a fixed torch seed per test, quiet DeepSpeed, shared fixtures."""
import logging

import pytest
import torch


def _quiet_deepspeed() -> None:
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    try:
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.ERROR)
    except Exception:  # deepspeed not importable: the tests that need it fail on their own
        pass


_quiet_deepspeed()


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same torch RNG state (and leaves the global default dtype alone)."""
    torch.manual_seed(1234)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def text_files(tmp_path_factory):
    """`(train.txt, valid.txt)` of plain English text (this Python's docstrings), shared by the robustness tests."""
    from camex_ds.data.prose import write_prose_corpus

    return write_prose_corpus(tmp_path_factory.mktemp("text"))


@pytest.fixture
def gen():
    """A private generator for drawing test tensors without touching the global RNG."""
    return torch.Generator().manual_seed(4321)


@pytest.fixture
def single_thread():
    """One intra-op thread: the tiny-shape tests are dominated by per-op overhead, and on a shared 2-core box
    a second spinning OpenMP thread makes them several times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
