"""Every transport of a one-machine job on the loopback interface.

gloo and NCCL pick their interface from the host name (gloo) or the first outside interface (NCCL), MPICH's UCX
and libfabric modules from the outside interfaces too: with every rank on this machine they would listen where
the network reaches them, for nothing. A launcher that starts every rank here (local, mpi, embedded Ray), a
loopback ``MASTER_ADDR`` (torchrun on one node, a bare run) and the in-process rank spawner set these variables
first; values the user set are kept (torch-free: the launchers' package imports no torch).

    env = {**os.environ, **loopback_environment()}   # {"GLOO_SOCKET_IFNAME": "lo", ...}
"""
from __future__ import annotations

import ipaddress
import os
import socket
from typing import Mapping, Optional

import psutil

#: The variables that put a transport's sockets on one interface: gloo, NCCL, and the network modules of
#: MPICH/Open MPI (UCX, libfabric's tcp provider).
INTERFACE_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "UCX_NET_DEVICES", "FI_TCP_IFACE")


def loopback_environment(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The ``INTERFACE_VARS`` ``environ`` (default ``os.environ``) does not set, naming the loopback interface;
    empty on a machine without one."""
    environ = os.environ if environ is None else environ
    names = [name for name, addrs in psutil.net_if_addrs().items()
             if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in addrs)]
    if not names:
        return {}
    return {k: names[0] for k in INTERFACE_VARS if k not in environ}


def is_loopback(addr: str) -> bool:
    """``addr`` (an IP address) is a loopback address; a host name is not."""
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False
