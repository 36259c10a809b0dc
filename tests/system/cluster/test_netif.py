"""The interface choice (camex_ds/netif.py) on hosts whose hostname resolves to loopback: two network namespaces."""
import json
import subprocess
import sys

import pytest

from tests import distributed
from .provision import require
from .hosts import Cluster

PROBE = ("import json, os; from camex_ds import netif; "
         "print(json.dumps([netif.hostname_is_usable(), netif.choose_socket_interface(), "
         "{v: os.environ.get(v) for v in netif.IFNAME_VARS}]))")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    require("netns")
    with Cluster(2, tmp_path_factory.mktemp("netif"), sshd=False) as cluster:
        yield cluster


def _probe(cluster, **env):
    proc = cluster.run(0, [sys.executable, "-c", PROBE], env={**distributed.env(), **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    usable, chosen, variables = json.loads(proc.stdout)
    assert not usable  # the premise: the hostname resolves to no address of this host but loopback
    return chosen, variables, proc.stderr


@pytest.mark.parametrize("master", [1, 0], ids=["remote_master", "master_is_this_host"])
def test_the_interface_routing_to_the_master_is_chosen_and_logged(hosts, master):
    chosen, variables, log = _probe(hosts, MASTER_ADDR=hosts.hosts[master].addr, LOCAL_RANK="0")
    assert chosen == "eth0"
    assert variables == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
    assert "no address other hosts reach; GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0" in log
    assert f"MASTER_ADDR {hosts.hosts[master].addr}" in log


def test_one_line_per_node_not_per_rank(hosts):
    assert _probe(hosts, MASTER_ADDR=hosts.hosts[1].addr, LOCAL_RANK="1")[2] == ""


def test_a_set_variable_is_kept_and_only_the_other_is_chosen(hosts):
    chosen, variables, log = _probe(hosts, MASTER_ADDR=hosts.hosts[1].addr, NCCL_SOCKET_IFNAME="ib0")
    assert variables == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "ib0"}
    chosen, variables, log = _probe(hosts, MASTER_ADDR=hosts.hosts[1].addr, GLOO_SOCKET_IFNAME="lo",
                                    NCCL_SOCKET_IFNAME="ib0")
    assert chosen is None and variables == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "ib0"} and log == ""


def test_one_machine_needs_no_choice(hosts):
    chosen, variables, log = _probe(hosts, MASTER_ADDR="127.0.0.1")
    assert chosen is None and variables == {"GLOO_SOCKET_IFNAME": None, "NCCL_SOCKET_IFNAME": None} and log == ""


def test_no_packet_leaves_for_the_route_lookup(hosts):
    """route_interface only asks the kernel (a UDP connect sends nothing): an address with no route gives None."""
    code = "from camex_ds import netif; print(netif.route_interface('192.0.2.1'))"
    out = hosts.run(0, [sys.executable, "-c", code], env=distributed.env()).stdout.strip()
    assert out == "None"  # the namespace has no default route
    code = "from camex_ds import netif; print(netif.route_interface('127.0.0.1'))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=distributed.env()).stdout.strip() == "lo"
