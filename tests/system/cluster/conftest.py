"""Fixtures of the cluster tests: hosts, the tiny model, its data cache and the one-host reference runs."""
import pytest

from tests import distributed
from .hosts import Cluster
from .provision import require
from .runs import train_args, write_model


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One prepared-data cache (tokenizer, token shards) for every training run of the cluster tests."""
    return tmp_path_factory.mktemp("cluster_data_cache")


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("model") / "tiny.json")


@pytest.fixture(scope="session")
def one_host(tmp_path_factory, data_cache, model):
    """The reference the multi-host runs must equal: the same run on one host (DeepSpeed's local launcher on
    loopback) with as many ranks, the experts spread over all of them; made once per world size."""
    runs = {}

    def run(world: int):
        if world not in runs:
            out = tmp_path_factory.mktemp(f"one_host_{world}")
            distributed.deepspeed(distributed.ROOT / "launcher" / "pretrain.py",
                                  *train_args(out, data_cache, model, extra=["--ep_size", world]), num_gpus=world)
            runs[world] = out
        return runs[world]

    return run


@pytest.fixture(scope="module")
def ssh_cluster(tmp_path_factory):
    """Two hosts, each running sshd, reachable from each other with the cluster's key."""
    require("ssh")
    with Cluster(2, tmp_path_factory.mktemp("ssh_cluster")) as cluster:
        yield cluster

