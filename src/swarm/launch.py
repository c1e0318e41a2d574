"""Starting a swarm of real processes on this machine: a bootstrap peer and servers, stopped by PID.

Used by the demo, the benchmarks and the tests:

    with LocalSwarm(model_dir, spans=["0:10", "10:20", "20:30"]) as swarm:
        model = AutoDistributedModel.from_pretrained(model_dir, initial_peers=swarm.initial_peers)

Every process binds 127.0.0.1 unless told otherwise, and every wait is bounded in time.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

MADDR_PATTERN = re.compile(r"/ip4/\S+/tcp/\d+/p2p/\w+")
# Environment of the peers started here (the caller's environment overrides it):
LOCAL_PEER_ENV = {
    # Peers that share this machine's cores take turns computing; OpenMP workers that spin 300,000 times
    # after their work (GNU OpenMP's default) steal the core from the next peer (measured: +15 ms per token).
    "GOMP_SPINCOUNT": "10000",
    # hivemind's default ("file_system") starts torch_shm_manager, which outlives its peer by 2 s holding the
    # peer's output open; the DHT shares no tensors here, so file descriptors serve as well.
    "HIVEMIND_MEMORY_SHARING_STRATEGY": "file_descriptor",
}


# What a fork server imports once when `preload_peers()` is on: the server's package, which imports torch,
# transformers and hivemind (not a module that peers run as `__main__`: runpy warns when that was imported)
PRELOADED_MODULES = ("swarm.server",)
_fork_server: multiprocessing.context.ForkServerContext | None = None


def preload_peers(modules: tuple[str, ...] = PRELOADED_MODULES):
    """From now on, starts each `python -m MODULE ...` peer of this process by forking a server process that has
    imported `modules` once (multiprocessing's fork server), instead of a new interpreter importing torch,
    transformers and hivemind anew: a peer is ready seconds sooner. The peer still runs `MODULE` as `__main__`
    with its own arguments, environment, output, session and process ID. For test suites that start hundreds of
    peers; the fork server takes this process's environment now, so call it before the environment matters."""
    global _fork_server
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(modules))
    saved = dict(os.environ)
    os.environ.update({**LOCAL_PEER_ENV, **saved, "PYTHONUNBUFFERED": "1"})  # read when the libraries load
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    _fork_server = context


def _run_forked(module: str, args: list[str], env: dict[str, str], output: multiprocessing.connection.Connection):
    """The body of a forked peer: `python -u -m module *args` in a session of its own, printing to `output`."""
    os.setsid()
    for stream in (1, 2):
        os.dup2(output.fileno(), stream)
    output.close()
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


class _ForkedProcess:
    """The part of `subprocess.Popen` that `PeerProcess` uses, for a peer forked by the fork server."""

    def __init__(self, module: str, args: list[str], env: dict[str, str]):
        reader, writer = os.pipe()
        output = multiprocessing.connection.Connection(writer, readable=False)
        self._process = _fork_server.Process(target=_run_forked, args=(module, args, env, output), daemon=False)
        self._process.start()
        output.close()
        self.pid = self._process.pid
        self.stdout = open(reader, errors="replace")

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.pid, timeout)
        return self._process.exitcode

    def kill(self):
        self._process.kill()


class PeerProcess:
    """One `python -m ...` child process whose output is collected in the background (forked by a fork server
    once `preload_peers()` is on)."""

    def __init__(self, args: list[str], name: str, env: dict[str, str] | None = None, log_path: Path | None = None):
        self.name = name
        self.args = args
        self.address: str | None = None  # a server's transport address, once it is ready
        self.lines: deque[str] = deque(maxlen=2000)
        self._new_line = threading.Condition()
        self._log = open(log_path, "w") if log_path else None
        environment = {**LOCAL_PEER_ENV, **os.environ, **(env or {})}
        if _fork_server is not None and args[0] == "-m":
            self.process = _ForkedProcess(args[1], args[2:], environment)
        else:
            self.process = subprocess.Popen(
                [sys.executable, "-u", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                env=environment,
                start_new_session=True,
            )
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_output(self):
        for line in self.process.stdout:
            if self._log:
                self._log.write(line)
                self._log.flush()
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """Waits until a line of output matches `pattern`; raises if the process exits or time runs out."""
        regex, deadline, seen = re.compile(pattern), time.monotonic() + timeout, 0
        with self._new_line:
            while True:
                lines = list(self.lines)
                for line in lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(lines)
                remaining = deadline - time.monotonic()
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(f"{self.name} exited with code {self.process.returncode}:\n{self.output()}")
                if remaining <= 0:
                    raise TimeoutError(f"{self.name} printed no line matching {pattern!r} in {timeout} s:\n{self.output()}")
                self._new_line.wait(min(remaining, 0.5))

    def wait_ready(self, timeout: float) -> str:
        """Waits for a server's `ready:` line; returns (and keeps in `.address`) its transport address."""
        self.address = self.wait_for(r"ready: .* at (\S+:\d+)", timeout).group(1)
        return self.address

    def wait_exit(self, timeout: float) -> int:
        """Waits until the process has exited and all its output is read; returns its exit code."""
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code

    def output(self, last: int = 40) -> str:
        return "\n".join(list(self.lines)[-last:])

    def signal(self, signal_number: int):
        """Sends `signal_number` unless the process has exited (a forked peer's exit code reaches this process
        a moment after the fork server has reaped it, so an exited peer can still look alive here)."""
        if self.process.poll() is None:
            try:
                os.kill(self.pid, signal_number)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0):
        """SIGTERM, then SIGKILL after `timeout`; also kills the process group (hivemind's p2pd children)."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(timeout)
        self._reader.join(timeout)
        if self._log:
            self._log.close()


def run_peer(args: list[str], timeout: float = 60.0, name: str = "peer") -> tuple[int, str]:
    """Runs `python -m ...` (`args`) to its end; returns its exit code and its output (stdout and stderr)."""
    peer = PeerProcess(args, name=name)
    try:
        return peer.wait_exit(timeout), peer.output(last=len(peer.lines))
    finally:
        peer.stop()


def start_bootstrap(
    host: str = "127.0.0.1", timeout: float = 60.0, extra_args: tuple[str, ...] = (), **kwargs
) -> tuple[PeerProcess, list[str]]:
    """Starts `python -m swarm.dht` (with `extra_args`); returns it and the multiaddrs to join with."""
    peer = PeerProcess(["-m", "swarm.dht", "--host", host, *extra_args], name="bootstrap", **kwargs)
    try:
        line = peer.wait_for(r"--initial-peers (.+)", timeout).group(1)
    except BaseException:
        peer.stop()
        raise
    return peer, MADDR_PATTERN.findall(line)


def launch_server(
    model: str | Path, blocks: str | None, initial_peers: list[str], *extra_args: str, host: str = "127.0.0.1", **kwargs
) -> PeerProcess:
    """Starts `python -m swarm.server` on `host` (a loopback address by default) without waiting for it."""
    args = ["-m", "swarm.server", str(model), "--host", host, "--initial-peers", *initial_peers]
    if blocks is not None:
        args += ["--blocks", blocks]
    return PeerProcess(args + list(extra_args), name=f"server {blocks or 'all'}", **kwargs)


def start_server(
    model: str | Path, blocks: str | None, initial_peers: list[str], *extra_args: str, timeout: float = 120.0, **kwargs
) -> PeerProcess:
    """Starts `python -m swarm.server` on 127.0.0.1 and waits for its `ready:` line."""
    server = launch_server(model, blocks, initial_peers, *extra_args, **kwargs)
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


def free_port(host: str = "127.0.0.1") -> int:
    """A port that nothing listens on now (another process may still take it before the caller does)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def start_delay_proxy(target: str, *proxy_args: str, timeout: float = 30.0, **kwargs) -> PeerProcess:
    """Starts `python -m swarm.delay_proxy` on 127.0.0.1 in front of `target` (with `proxy_args`, e.g.
    `--delay-ms 50`) and waits until it listens; its `address` is the one to dial."""
    proxy = PeerProcess(["-m", "swarm.delay_proxy", "--target", target, *proxy_args], name=f"proxy to {target}", **kwargs)
    try:
        proxy.wait_ready(timeout)
    except BaseException:
        proxy.stop()
        raise
    return proxy


class LocalSwarm:
    """A bootstrap peer (unless it joins `initial_peers`) plus one server per span, all on 127.0.0.1; stops them
    all on exit. With `proxy_args`, each server sits behind a delay proxy of its own (`swarm.delay_proxy`, started
    with those arguments) and announces the proxy's address, so that every connection to it goes through the
    proxy."""

    def __init__(
        self,
        model: str | Path,
        spans: list[str | None],
        server_args: tuple[str, ...] = (),
        log_dir: str | Path | None = None,
        ready_timeout: float = 180.0,
        initial_peers: list[str] | None = None,
        proxy_args: tuple[str, ...] | None = None,
    ):
        self.model = model
        self.proxy_args = proxy_args
        self.proxies: list[PeerProcess] = []
        self.ready_timeout = ready_timeout
        self.spans = spans
        self.server_args = server_args
        self.log_dir = Path(log_dir) if log_dir else None
        self.bootstrap: PeerProcess | None = None
        self.servers: list[PeerProcess] = []
        self.initial_peers: list[str] = list(initial_peers or [])  # given: join that DHT, start no bootstrap peer

    def __enter__(self) -> "LocalSwarm":
        return self.start()

    def start(self) -> "LocalSwarm":
        """Starts the peers and waits until every server is ready (what `with` does; for notebooks, which call
        `stop()` themselves)."""
        try:
            if not self.initial_peers:
                self.bootstrap, self.initial_peers = start_bootstrap(log_path=self._log_path("bootstrap"))
            launched = [self.launch_server(span) for span in self.spans]
            for server in launched:
                server.wait_ready(self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def launch_server(self, span: str | None, *extra_args: str) -> PeerProcess:
        """Starts one more server without waiting for it to be ready."""
        name = f"{(span or 'all').replace(':', '-')}-{len(self.servers)}"
        if self.proxy_args is not None:
            port = free_port()
            proxy = start_delay_proxy(f"127.0.0.1:{port}", *self.proxy_args, log_path=self._log_path(f"proxy-{name}"))
            self.proxies.append(proxy)
            extra_args = ("--transport-port", str(port), "--announce-port", proxy.address.rpartition(":")[2], *extra_args)
        server = launch_server(self.model, span, self.initial_peers, *self.server_args, *extra_args, log_path=self._log_path(f"server-{name}"))
        self.servers.append(server)
        return server

    def add_server(self, span: str | None, *extra_args: str) -> PeerProcess:
        """Starts one more server and waits for its `ready:` line."""
        server = self.launch_server(span, *extra_args)
        server.wait_ready(self.ready_timeout)
        return server

    def _log_path(self, name: str) -> Path | None:
        if self.log_dir is None:
            return None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self.log_dir / f"{name}.log"

    def stop(self):
        """Stops the servers (all at once), then the bootstrap peer, which their last announcements go through."""
        for server in self.servers:
            server.signal(signal.SIGTERM)
        for peer in [*self.servers, self.bootstrap, *self.proxies]:
            if peer is not None:
                peer.stop()

    def __exit__(self, *exc_info):
        self.stop()
