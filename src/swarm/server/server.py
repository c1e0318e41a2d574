"""A server: loads its span's blocks, announces them in the DHT and serves them until told to stop."""

from __future__ import annotations

import logging
import math
import threading
import time

import hivemind
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from swarm import __version__
from swarm.checkpoint import CheckpointIndex, model_name_of, resolve_model_path
from swarm.errors import ConfigurationError, ServerUnavailableError
from swarm.models import family_for
from swarm.models.base import LoadedSpan, load_span
from swarm.records import ServerRecord, ServerState, announce
from swarm.server.config import ServerConfig
from swarm.server.handlers import RequestHandler
from swarm.server.sessions import SessionManager
from swarm.spans import BlockSpan
from swarm.transport import TensorServer
from swarm.wire import dtype_name

logger = logging.getLogger(__name__)


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.path = resolve_model_path(config.model)
        self.model_name = config.model_name or model_name_of(config.model)
        model_config = _load_config(self.path)
        self.family = family_for(model_config)
        self.model_config = self.family.prepare_config(model_config)
        num_blocks = self.family.num_blocks(self.model_config)
        self.span = config.blocks or BlockSpan(0, num_blocks)
        if self.span.end > num_blocks:
            raise ConfigurationError(f"blocks {self.span} are outside the model, which has blocks 0:{num_blocks}")
        if not config.initial_peers and not config.new_swarm:
            raise ConfigurationError("pass --initial-peers to join a swarm, or --new-swarm to start one")
        self.stop_requested = threading.Event()
        self.dht: hivemind.DHT | None = None
        self.transport: TensorServer | None = None
        self.handler: RequestHandler | None = None

    def run(self):
        """Serves until `stop_requested` is set, then leaves the swarm cleanly."""
        try:
            self._start()
            while not self.stop_requested.wait(self.config.announce_period):
                self.handler.sessions.close_idle()
                self._announce(ServerState.ONLINE)
        finally:
            self._shutdown()

    def _start(self):
        config = self.config
        self.dht = hivemind.DHT(
            initial_peers=config.initial_peers, host_maddrs=[f"/ip4/{config.host}/tcp/{config.port}"], start=True
        )
        self.visible_maddrs = [str(maddr) for maddr in self.dht.get_visible_maddrs()]
        if config.new_swarm:
            print("To join this swarm, use --initial-peers " + " ".join(self.visible_maddrs), flush=True)
        self.transport = TensorServer(config.host, config.transport_port, self._handle)
        self.address = f"{self._announce_host()}:{self.transport.port}"
        self._announce(ServerState.JOINING, throughput=0.0)
        loaded = self._load_blocks()
        self.throughput = measure_throughput(self.family, loaded)
        sessions = SessionManager(idle_timeout=config.session_timeout)
        max_session_length = config.max_session_length or getattr(self.model_config, "max_position_embeddings", 1 << 16)
        self.handler = RequestHandler(self.family, loaded, sessions, self.model_name, __version__, max_session_length)
        self.transport.start()
        self._announce(ServerState.ONLINE)
        logger.info(
            f"ready: serving {self.model_name} blocks {self.span} ({len(self.span)} of "
            f"{self.family.num_blocks(self.model_config)}) at {self.address}, {dtype_name(config.dtype)}, "
            f"{self.throughput:.1f} tokens/s, peer {self.dht.peer_id}"
        )

    def _handle(self, fields, tensors, context):
        if self.handler is None:
            raise ServerUnavailableError("the server is still loading its blocks")
        return self.handler(fields, tensors, context)

    def _load_blocks(self) -> LoadedSpan:
        checkpoint = CheckpointIndex(self.path)
        logger.info(f"Loading blocks {self.span} of {self.model_name} from {self.path}")
        with tqdm(total=len(self.span), desc=f"Loading blocks {self.span}", unit="block") as progress:
            return load_span(
                self.family, self.model_config, checkpoint, self.span, self.config.dtype, self.config.device, progress
            )

    def _announce_host(self) -> str:
        if self.config.announce_host:
            return self.config.announce_host
        if self.config.host not in ("0.0.0.0", "::"):
            return self.config.host
        hosts = [str(maddr).split("/")[2] for maddr in self.visible_maddrs if str(maddr).startswith("/ip4/")]
        public = [host for host in hosts if not host.startswith("127.")]
        return (public or hosts or ["127.0.0.1"])[0]

    def _announce(self, state: ServerState, throughput: float | None = None):
        record = ServerRecord(
            peer_id=str(self.dht.peer_id),
            start=self.span.start,
            end=self.span.end,
            state=state,
            throughput=self.throughput if throughput is None else throughput,
            version=__version__,
            address=self.address,
            dtype=dtype_name(self.config.dtype),
        )
        if not announce(self.dht, self.model_name, record, self.config.record_ttl):
            logger.warning(f"Could not store every record of blocks {self.span} in the DHT")

    def _shutdown(self):
        if self.handler is not None:
            self.handler.accepting_sessions = False
        if self.dht is not None and self.dht.is_alive():
            try:
                self._announce(ServerState.OFFLINE, throughput=0.0)
            except Exception as error:
                logger.warning(f"Could not announce going offline: {error}")
        if self.transport is not None:
            deadline = time.monotonic() + self.config.shutdown_grace
            while self.handler is not None and len(self.handler.sessions) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.transport.stop()
        if self.dht is not None:
            self.dht.shutdown()
        logger.info(f"Server of {self.model_name} blocks {self.span} stopped")


def _load_config(path):
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        raise ConfigurationError(f"{path} is not a model that transformers can read: {error}") from None


def measure_throughput(family, loaded: LoadedSpan, repeats: int = 3) -> float:
    """Tokens per second for one token through the whole span, batch 1, best of `repeats` after a warm-up."""
    inputs = family.example_inputs(loaded)
    best = math.inf
    with torch.inference_mode():
        family.forward(loaded, loaded.span, inputs, None)
        for _ in range(repeats):
            started = time.perf_counter()
            family.forward(loaded, loaded.span, inputs, None)
            best = min(best, time.perf_counter() - started)
    return 1.0 / max(best, 1e-6)
