"""Which network interface gloo and NCCL use when the hostname would send peers to loopback.

Gloo advertises the address this machine's hostname resolves to. Where that is loopback (Debian's
`127.0.1.1 <host>` line, many containers, network namespaces) while the master is another machine, every
peer is told to connect to 127.0.0.1 and the set-up fails (`Gloo connectFullMesh failed ... remote=[127.0.0.1]`).
The interface the kernel routes the master's address through is the one the peers can reach.
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's (primary) IPv4 address


def _ipv4(host: str) -> list[str]:
    try:
        return sorted({a[4][0] for a in socket.getaddrinfo(host, None, socket.AF_INET)})
    except socket.gaierror:
        return []


def _bindable(ip: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
            return True
        except OSError:
            return False


def hostname_is_usable() -> bool:
    """Whether the hostname resolves to a non-loopback address of this machine: what gloo advertises by default
    (it falls back to loopback when the hostname does not resolve to a local address)."""
    return any(not ip.startswith("127.") and _bindable(ip) for ip in _ipv4(socket.gethostname()))


def route_interface(ip: str) -> str | None:
    """The interface whose address the kernel would send from to reach `ip` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, 9))  # a UDP connect only picks the route and the source address
        except OSError:
            return None
        source = s.getsockname()[0]
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            if socket.inet_ntoa(packed[20:24]) == source:
                return name
    return None


def choose_socket_interface(environ=os.environ) -> str | None:
    """Set the unset `GLOO_SOCKET_IFNAME`/`NCCL_SOCKET_IFNAME` to the interface that routes to `MASTER_ADDR`,
    when the hostname resolves to no usable address (loopback, say) and the master is remote; say so once per
    node. Returns the
    interface chosen, or None when nothing needed choosing (a set variable, one machine, a usable hostname)."""
    unset = [v for v in IFNAME_VARS if not environ.get(v)]
    master = _ipv4(environ.get("MASTER_ADDR", ""))
    if not unset or not master or master[0].startswith("127.") or hostname_is_usable():
        return None
    name = route_interface(master[0])
    if name is None:
        return None
    environ.update({v: name for v in unset})
    if environ.get("LOCAL_RANK", "0") == "0":
        host = socket.gethostname()
        print(f"camex_ds: hostname {host!r} resolves to {', '.join(_ipv4(host)) or 'nothing'}, no address other "
              f"hosts reach; {' '.join(f'{v}={name}' for v in unset)} (the interface routing to MASTER_ADDR "
              f"{environ['MASTER_ADDR']}); set them to choose another", file=sys.stderr, flush=True)
    return name
