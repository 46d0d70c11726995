"""Rank 0's rendezvous store, listening only where it must.

torch's default ``env://`` rendezvous makes rank 0 host an unauthenticated TCP store on *every*
interface (``*:MASTER_PORT``), even when every rank is on this machine and ``MASTER_ADDR`` is
127.0.0.1. Here rank 0 binds the listening socket itself and hands it to ``TCPStore`` through
``master_listen_fd``:

* ``MASTER_ADDR`` on loopback (single-machine launches: local, mpi, embedded Ray) → that loopback address only;
* otherwise the interface of ``MASTER_ADDR`` (the address the other nodes dial), or ``launch.bind``
  when the user names one (``0.0.0.0`` only when asked for explicitly);
* a multi-node job whose ``MASTER_ADDR`` name is loopback on rank 0's node alone: one line asking for
  ``launch.bind`` (the other nodes could not reach a store there).

A port that is taken is one line naming it, at once, instead of an EADDRINUSE traceback on rank 0 and
a rendezvous time-out on the others. Under torchrun the elastic agent hosts the store itself (on the
address and port it chose): every rank then only connects.

    store = create_store(rank, world_size, "127.0.0.1", 29500, timedelta(seconds=300), bind=None)
"""
from __future__ import annotations

import errno
import os
import socket
from datetime import timedelta
from typing import Mapping, Optional

import torch.distributed as dist

from .loopback import is_loopback

AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"


class RendezvousError(ValueError):
    """The store cannot listen where the job says it must; the message is one line for the user."""


def resolve(host: str) -> str:
    """The IPv4 address of ``host`` (a name or an address)."""
    try:
        return socket.gethostbyname(host)
    except OSError as e:
        raise RendezvousError(f"MASTER_ADDR={host!r} does not resolve ({e.strerror or e}): set MASTER_ADDR to "
                              f"an address of the first node") from None


def resolves_to_loopback(host: str) -> bool:
    """``host`` resolves to a loopback address here. A name with no IPv4 address is not: it is left to torch, which
    resolves it itself when connecting (IPv6 too; under torchrun every rank only connects)."""
    try:
        return is_loopback(resolve(host))
    except RendezvousError:
        return False


def spans_nodes(master_addr: str, world_size: int, local_world_size: int) -> bool:
    """Whether the job may have ranks on other machines: some ranks are not on this node (``local_world_size`` <
    ``world_size``) and ``MASTER_ADDR`` is not a loopback address every rank dials here (127.0.0.1, ::1,
    ``localhost``: two 'nodes' on one machine). A host name that resolves to loopback on this node alone (Debian's
    /etc/hosts: 127.0.1.1) is routable from the others."""
    return local_world_size < world_size and not (master_addr == "localhost" or is_loopback(master_addr))


def bind_address(master_addr: str, bind: Optional[str] = None, multi_node: bool = False) -> str:
    """Where rank 0's store listens: ``bind`` if given, else the master's own address — on loopback for a
    loopback master, and that very loopback address: a host name in Debian's /etc/hosts is 127.0.1.1, which a
    socket bound to 127.0.0.1 does not answer (every rank, rank 0's own client too, waited out the timeout).
    ``multi_node`` (:func:`spans_nodes`) with a master name that is loopback here is one line (RendezvousError): the
    other nodes would never reach the store and every rank waited out the timeout."""
    if bind:
        return "0.0.0.0" if bind in ("all", "*") else resolve(bind)
    addr = resolve(master_addr)
    if multi_node and is_loopback(addr):
        raise RendezvousError(f"MASTER_ADDR={master_addr} is {addr} on rank 0's node, a loopback address the other "
                              f"nodes of this multi-node job cannot reach (its /etc/hosts maps the name there): set "
                              f"launch.bind to the address of this node's interface they dial, or MASTER_ADDR to it")
    return addr


def listening_socket(addr: str, port: int) -> socket.socket:
    """A TCP socket bound to (addr, port) and listening; a taken port or a foreign address is one line."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((addr, port))
        s.listen(socket.SOMAXCONN)
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise RendezvousError(f"MASTER_PORT {port} is already in use on {addr}: another job or service holds "
                                  f"it; set MASTER_PORT to a free port (the launchers and generated batch "
                                  f"scripts pick one that is checked free)") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise RendezvousError(f"cannot listen on {addr}:{port}: {addr} is not an address of this machine "
                                  f"(rank 0 must run on MASTER_ADDR's node; or set launch.bind to one of its "
                                  f"interfaces)") from None
        raise
    return s


def agent_hosts_store(environ: Mapping[str, str] = os.environ) -> bool:
    """True under torchrun, whose elastic agent already hosts the store on MASTER_PORT and tells its workers so
    (``TORCHELASTIC_USE_AGENT_STORE=True``, what torch's own ``env://`` rendezvous reads)."""
    return environ.get(AGENT_STORE_ENV) == "True"


def create_store(rank: int, world_size: int, master_addr: str, port: int, timeout: timedelta,
                 bind: Optional[str] = None, multi_node: bool = False) -> dist.TCPStore:
    """The job's TCP store: rank 0 hosts it on :func:`bind_address`, the others connect to MASTER_ADDR; under
    torchrun every rank, rank 0 included, connects to the agent's store (binding it would find the port taken).
    ``multi_node``: :func:`spans_nodes`."""
    if rank != 0 or agent_hosts_store():
        return dist.TCPStore(master_addr, port, world_size, False, timeout)
    sock = listening_socket(bind_address(master_addr, bind, multi_node), port)
    # TCPStore takes ownership of the descriptor; the Python object must not close it behind its back.
    fd = sock.detach()
    return dist.TCPStore(master_addr, port, world_size, True, timeout, master_listen_fd=fd)
