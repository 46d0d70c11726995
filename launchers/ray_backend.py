"""``--backend ray``: one Ray actor per rank inside a placement group (one bundle per node, the ranks of
a node packed into it). Named ``ray_backend`` so that ``import ray`` inside this package is never
ambiguous.

* Cluster: ``--address`` / ``launch.address`` or ``RAY_ADDRESS`` (set by ``ray job submit``) → connect;
  otherwise an embedded single-machine cluster is started (``address="local"``: never silently joins a
  stray ``ray start`` cluster), without dashboard and without log forwarding (our actors forward the
  ranks' lines themselves, prefixed, exactly once), every Ray server on loopback, a token of its own
  (``embedded_cluster_environment``).
* Ranks: each actor runs its rank as a **subprocess** (``python -m dist_train run …``) rather than calling
  ``dist_train.entry.run_rank`` inside the actor. Reasons: the rank's SIGTERM/SIGUSR1 handlers need a
  process main thread of its own; a rank that segfaults or is SIGKILLed leaves the actor alive to report
  its exit status and last stderr lines; every attempt gets a fresh process (no leftover process group,
  CUDA context or threads); and stdout/stderr capture works the same as for the local backend.
* Rendezvous: rank 0's actor reports its node's IP and a free port there → MASTER_ADDR/PORT for all.
* GPUs: each actor reserves one GPU; the ranks of a node see the union of their node's reserved GPUs in
  ``CUDA_VISIBLE_DEVICES`` and LOCAL_RANK indexes their own one (what ``torch.cuda.set_device`` expects).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from dist_train.atomic_write import write_bytes_atomic
from dist_train.held_stderr import stderr_held_back
from dist_train.loopback import loopback_environment
from launchers.env import free_port
from launchers.local import rank_environment
from launchers.procs import ConsoleSink, RankProcess, Sink
from launchers.supervisor import RankProgress, progress_from_heartbeats


@contextlib.contextmanager
def kept_signal_handlers(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)):
    """Restore the handlers of ``signals`` after the body, whatever it installed (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in signals}
    try:
        yield
    finally:
        for s, h in saved.items():
            if h is not None and signal.getsignal(s) != h:
                signal.signal(s, h)


#: What an embedded (single-machine) cluster needs in the environment before ``import ray``: Ray 2.60 keeps a
#: cluster on loopback on macOS/Windows, and this switch (read once, when ray is imported; inherited by the
#: processes it starts) does the same here: the node's address is 127.0.0.1, and its GCS, raylet, worker and agent
#: servers and its unauthenticated Prometheus metrics ports listen on loopback instead of every interface.
#: ``_node_ip_address="127.0.0.1"`` does not: Ray maps it back to the host's routable address.
EMBEDDED_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def embedded_cluster_environment(environ: Optional[dict] = None) -> dict[str, str]:
    """What to set before ``import ray`` for an embedded cluster: every server on loopback (``EMBEDDED_LOOPBACK_ENV``)
    and, unless the user chose an authentication mode or token, token authentication with a fresh token of this
    launch held in the environment alone (of its own processes: readable by this user only). Otherwise Ray 2.60
    writes ``~/.ray/auth_token`` with mode 0644 and keeps it for every later cluster: where others can read the
    home directory, any local user could take it and run code as this user through the loopback ports."""
    environ = os.environ if environ is None else environ
    env = dict(EMBEDDED_LOOPBACK_ENV)
    if not any(k in environ for k in AUTH_VARS):
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    return env


def ray_token_available(environ: Optional[dict] = None) -> bool:
    """A Ray authentication token this process could present (the places Ray itself looks)."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_TOKEN"):
        return True
    path = environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return os.path.isfile(path) and os.path.getsize(path) > 0


def token_auth_environment(environ: Optional[dict] = None) -> dict[str, str]:
    """What to set before connecting to an existing cluster: token mode when a token exists and the user
    did not choose a mode (``ray start`` turns token authentication on whenever ~/.ray/auth_token
    exists, but a connecting client only presents the token in token mode)."""
    environ = os.environ if environ is None else environ
    if "RAY_AUTH_MODE" not in environ and ray_token_available(environ):
        return {"RAY_AUTH_MODE": "token"}
    return {}


def connection_failure_message(address: str, error: BaseException) -> str:
    """One line for a failed ``ray.init(address=...)``, naming the address and what to set."""
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    token = "a token is available" if ray_token_available() else "no token found"
    return (f"cannot connect to the Ray cluster at {address} ({type(error).__name__}; RAY_AUTH_MODE={mode}, {token}): "
            f"check the address (ray status on the head node), and if the cluster uses token authentication set "
            f"RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to its token (the head node's ~/.ray/auth_token) and "
            f"RAY_AUTH_MODE=token")


def refuse_unreachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` cluster address where nothing accepts a TCP connection is one line at once (ValueError),
    instead of minutes of Ray's reconnect attempts and their log lines. Other forms (``auto``, ``ray://…``,
    ``http://…``) are left to Ray's own resolution."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host or "/" in host:
        return
    try:  # an IPv6 address is written [addr]:port; the brackets are not part of the host
        socket.create_connection((host.removeprefix("[").removesuffix("]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(f"Ray cluster address {address} (--address / launch.address / RAY_ADDRESS): nothing "
                         f"accepts connections there ({e.strerror or type(e).__name__}); start the cluster "
                         f"(ray start --head, then ray status) or leave the address unset for an embedded "
                         f"single-machine cluster") from None


def write_missing(files: dict[str, bytes]) -> None:
    """Write each file (absolute path -> bytes) that this node lacks or holds with other bytes (temp + rename): the
    launcher's config copy (run.dir/launched_config.yaml, which the rank command names) on a node whose run.dir is
    not the launcher's (node-local scratch). One with the same bytes (a shared run.dir: the launcher's own) is left
    as it is; one with other bytes is an earlier launch's copy left on that node's scratch, which its ranks would
    run instead of the config launched now (an edited lr, steps, checkpoint.dir)."""
    for name, data in files.items():
        path = Path(name)
        with contextlib.suppress(FileNotFoundError):
            if path.read_bytes() == data:
                continue
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)


class RankActor:
    """Runs on a Ray worker: owns one rank's process and buffers its output until the driver polls."""

    def __init__(self) -> None:
        self._proc: Optional[RankProcess] = None
        self._lines: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._run_dir: Optional[Path] = None
        self._rank = 0
        self._attempt = 0
        self._started = 0.0

    def node_info(self) -> dict:
        import ray

        return {"ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "python": sys.executable}

    def free_port(self) -> int:
        return free_port()

    def _sink(self, stream: str, text: str) -> None:
        with self._lock:
            self._lines.append((stream, text))

    def start(self, argv: list[str], env: dict[str, str], rank: int, run_dir: str, attempt: int,
              cwd: Optional[str], files: Optional[dict[str, bytes]] = None) -> int:
        """Start the rank's process; ``files`` (absolute path -> bytes) are written first where this node lacks them."""
        self._run_dir, self._rank, self._attempt, self._started = Path(run_dir), rank, attempt, time.time()
        if cwd and not os.path.isdir(cwd):
            cwd = None  # another node without the driver's directory: run where the worker is
        write_missing(files or {})
        full = {**os.environ, **env}
        self._proc = RankProcess(argv, rank, full, self._sink, log_dir=self._run_dir / "logs", attempt=attempt,
                                 cwd=cwd, die_with_parent=False)
        return self._proc.pid

    def poll(self) -> dict:
        """New console lines, the return code (None = running) and heartbeat progress of this rank."""
        code = self._proc.poll() if self._proc else None
        with self._lock:
            lines, self._lines = self._lines, []
        prog = progress_from_heartbeats(self._run_dir, range(self._rank, self._rank + 1), self._attempt,
                                        self._started) if self._run_dir else {}
        return {"lines": lines, "code": code, "progress": prog.get(self._rank)}

    def send_signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.proc.poll() is None:
            self._proc.send_signal(sig)

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()

    def tail(self) -> list[str]:
        return list(self._proc.tail) if self._proc else []

    def close(self) -> None:
        if self._proc is not None:
            self._proc.close()


def _gpu_layout(infos: list[dict]) -> list[tuple[str, int]]:
    """Per rank: (CUDA_VISIBLE_DEVICES for its node, its LOCAL_RANK index into it)."""
    by_node: dict[str, list[str]] = {}
    for info in infos:
        by_node.setdefault(info["node_id"], []).extend(info["gpu_ids"])
    out = []
    for info in infos:
        visible = sorted(set(by_node[info["node_id"]]), key=lambda g: (len(g), g))
        own = info["gpu_ids"][0] if info["gpu_ids"] else None
        out.append((",".join(visible), visible.index(own) if own is not None else -1))
    return out


class RayAttempt:
    def __init__(self, actors: list, sink: Sink, started: float):
        import ray

        self._ray, self.actors, self.sink, self.started = ray, actors, sink, started
        self.world_size = len(actors)
        self._codes: list[Optional[int]] = [None] * len(actors)
        self._progress: dict[int, tuple[Optional[int], float]] = {}
        self._dead_tail: dict[int, list[str]] = {}

    def poll(self) -> list[Optional[int]]:
        refs = {r: a.poll.remote() for r, a in enumerate(self.actors) if self._codes[r] is None}
        for r, ref in refs.items():
            try:
                res = self._ray.get(ref, timeout=30)
            except Exception as e:  # noqa: BLE001 - RayActorError / node loss: this rank is gone
                self._codes[r] = 1
                self._dead_tail[r] = [f"Ray actor of rank {r} died: {type(e).__name__}: {str(e).splitlines()[0]}"]
                continue
            for stream, text in res["lines"]:
                self.sink(stream, text)
            if res["progress"] is not None:
                self._progress[r] = RankProgress(*res["progress"])
            self._codes[r] = res["code"]
        return list(self._codes)

    def progress(self) -> dict[int, RankProgress]:
        return dict(self._progress)

    def send_signal(self, sig: int) -> None:
        self._ray.get([a.send_signal.remote(int(sig)) for a in self.actors])

    def kill(self) -> None:
        refs = [a.kill.remote() for a in self.actors]
        try:
            self._ray.get(refs, timeout=30)
        except Exception:  # noqa: BLE001 - a dead actor's rank died with it
            return

    def tail(self, rank: int) -> list[str]:
        if rank in self._dead_tail:
            return self._dead_tail[rank]
        try:
            return self._ray.get(self.actors[rank].tail.remote(), timeout=30)
        except Exception:  # noqa: BLE001
            return []

    def close(self) -> None:
        try:
            self.poll()  # the last lines
            self._ray.get([a.close.remote() for a in self.actors], timeout=60)
        except Exception:  # noqa: BLE001 - best effort; the actors are killed next either way
            pass
        for a in self.actors:
            self._ray.kill(a)


class RayBackend:
    """Start ranks as Ray actors. ``address`` None and no RAY_ADDRESS → an embedded local cluster."""

    name = "ray"

    def __init__(self, nproc: int, run_dir: Path, address: Optional[str] = None, nodes: int = 1,
                 gpus_per_node: int = 0, sink: Optional[Sink] = None, cpus_per_rank: float = 1.0,
                 placement_timeout_s: float = 120.0, files: Optional[dict[str, bytes]] = None):
        if nproc < 1 or nodes < 1:
            raise ValueError(f"--nproc {nproc} --nodes {nodes}: both must be >= 1")
        if nproc % nodes:
            raise ValueError(f"--nproc {nproc} is not divisible by --nodes {nodes}: every node runs the same "
                             f"number of ranks (e.g. --nproc {nodes * max(1, nproc // nodes)})")
        if gpus_per_node and gpus_per_node != nproc // nodes:
            raise ValueError(f"--gpus-per-node {gpus_per_node} with --nproc {nproc} on {nodes} node(s): one rank "
                             f"per GPU means --nproc {gpus_per_node * nodes}")
        self.nproc, self.nodes, self.gpus_per_node = nproc, nodes, gpus_per_node
        self.run_dir, self.sink, self.cpus_per_rank = Path(run_dir), sink or ConsoleSink(), cpus_per_rank
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.placement_timeout_s = placement_timeout_s
        self.files = dict(files or {})  # what every rank's node needs at these paths (write_missing)
        self._pg = None
        self._embedded = False

    # cluster --------------------------------------------------------------------------------
    def connect(self) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # before `import ray`: Ray reads the authentication mode and the loopback switch once, when it is imported
        if self.address:
            refuse_unreachable(self.address)
            os.environ.update(token_auth_environment())
        else:
            os.environ.update(embedded_cluster_environment())
        import ray

        if ray.is_initialized():
            return
        common: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
        # ray.init() replaces SIGTERM/SIGINT handlers with its own (exit at once): keep the launcher's,
        # which forward a preemption to the ranks so that they checkpoint.
        with kept_signal_handlers():
            if self.address:
                # Ray's C++ client logs each of its ~20 failed attempts; on failure one line says why.
                with stderr_held_back() as held:
                    try:
                        ray.init(address=self.address, **common)
                    except (ConnectionError, ray.exceptions.AuthenticationError) as e:
                        held.drop()
                        raise ValueError(connection_failure_message(self.address, e)) from None
            else:
                self._embedded = True
                ray.init(address="local", num_cpus=max(self.nproc * self.cpus_per_rank, os.cpu_count() or 1),
                         num_gpus=self.gpus_per_node or None, include_dashboard=False, **common)
        from ray.util.placement_group import placement_group

        per_node = self.nproc // self.nodes
        bundle: dict[str, float] = {"CPU": per_node * self.cpus_per_rank}
        if self.gpus_per_node:
            bundle["GPU"] = float(self.gpus_per_node)
        self._pg = placement_group([dict(bundle) for _ in range(self.nodes)],
                                   strategy="STRICT_SPREAD" if self.nodes > 1 else "PACK")
        print(f"[launcher] waiting up to {self.placement_timeout_s:g} s (launch.placement_timeout_s) for Ray to "
              f"place {self.nodes} node bundle(s) of {bundle}{' on different nodes' if self.nodes > 1 else ''}",
              file=sys.stderr, flush=True)
        try:
            ray.get(self._pg.ready(), timeout=self.placement_timeout_s)
        except Exception as e:  # noqa: BLE001 - GetTimeoutError: the cluster is too small
            raise ValueError(f"Ray cluster cannot place {self.nodes} node bundle(s) of {bundle} within "
                             f"{self.placement_timeout_s:g} s (launch.placement_timeout_s): it has "
                             f"{ray.cluster_resources()} ({type(e).__name__})") from None

    def shutdown(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
            self._pg = None
        if self._embedded:
            ray.shutdown()

    # one attempt ---------------------------------------------------------------------------------
    def start(self, argv: list[str], env: dict[str, str], attempt: int) -> RayAttempt:
        if self._pg is None:
            self.connect()  # first: it prepares the environment Ray reads when it is imported
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        started = time.time()
        remote_cls = ray.remote(RankActor)
        per_node = self.nproc // self.nodes
        actors = [remote_cls.options(
            num_cpus=self.cpus_per_rank, num_gpus=1 if self.gpus_per_node else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=r // per_node),
        ).remote() for r in range(self.nproc)]
        infos = ray.get([a.node_info.remote() for a in actors])
        port = ray.get(actors[0].free_port.remote())
        gpus = _gpu_layout(infos)
        local_of = [r % per_node for r in range(self.nproc)]
        cwd = os.getcwd()
        # An embedded cluster is this machine alone: rendezvous and collectives stay on loopback.
        master = "127.0.0.1" if self._embedded else infos[0]["ip"]
        local_only = loopback_environment() if self._embedded else {}
        starts = []
        for r, actor in enumerate(actors):
            rank_argv = [infos[r]["python"] if a == sys.executable else a for a in argv]
            extra = {**local_only, **env}
            extra["PYTHONPATH"] = os.pathsep.join(filter(None, [cwd, os.environ.get("PYTHONPATH")]))
            local_rank = local_of[r]
            if self.gpus_per_node:
                extra["CUDA_VISIBLE_DEVICES"], local_rank = gpus[r]
            rank_env = rank_environment({}, r, self.nproc, local_rank, per_node, master, port, extra)
            starts.append(actor.start.remote(rank_argv, rank_env, r, str(self.run_dir.absolute()), attempt, cwd,
                                             self.files))
        ray.get(starts)
        return RayAttempt(actors, self.sink, started)
