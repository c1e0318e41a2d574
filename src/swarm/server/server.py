"""A server: picks its span, loads its blocks, announces them in the DHT and serves them until told to stop."""

from __future__ import annotations

import logging
import resource
import threading
import time
from pathlib import Path

import hivemind
import psutil
from tqdm.auto import tqdm

from swarm import __version__, wire
from swarm.checkpoint import CheckpointIndex, load_model_config, local_model_path, model_name_of
from swarm.distribution.fetch import split_pin
from swarm.errors import AccessDeniedError, ConfigurationError, ServerUnavailableError
from swarm.handshake import answer_hello
from swarm.identity import Identity
from swarm.models import FAMILIES, family_for
from swarm.models.base import LoadedSpan, load_span
from swarm.network import load_swarm_key, start_dht
from swarm.quantization import rows_independent
from swarm.records import ServerRecord, ServerState, announce, fetch_records, reachable_host
from swarm.server.batching import ComputeThread
from swarm.server.block_selection import block_capacities, blocks_that_fit, choose_span, should_move
from swarm.server.config import ServerConfig
from swarm.server.files import ServedFiles, open_served_files
from swarm.server.handlers import RequestHandler, RequestLimits
from swarm.server.push import PushLinks
from swarm.server.sessions import SessionManager
from swarm.server.throughput import seconds_per_block
from swarm.spans import BlockSpan
from swarm.transport import TensorServer, TransportLimits
from swarm.wire import dtype_name

logger = logging.getLogger(__name__)

HOUSEKEEPING_PERIOD = 1.0  # seconds between checks for idle sessions (and for announcing, rebalancing)
PROCESS_RESERVE = 1 << 30  # bytes kept for the process itself when the span is sized by available memory


def raise_open_files_limit():
    """Raises this process's limit on open files to the most it may have: each connection holds one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as error:
            logger.warning(f"Could not raise the limit on open files from {soft} to {hard}: {error}")


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        if not config.initial_peers and not config.new_swarm:
            raise ConfigurationError("pass --initial-peers to join a swarm, or --new-swarm to start one")
        self.local_path = local_model_path(config.model)
        if self.local_path is None and not config.initial_peers:
            raise ConfigurationError(
                f"{config.model!r} is neither a local model directory nor a repo id in the local Hugging Face cache, "
                "and a new swarm has no published model to fetch it from"
            )
        self.model_name = config.model_name or config.publish or model_name_of(split_pin(config.model)[0])
        # who this server is: its records are signed, and it proves it to every client that connects
        self.identity = Identity.load_or_create(config.identity) if config.identity else Identity.generate()
        self.swarm_key = load_swarm_key(config.swarm_key) if config.swarm_key is not None else None
        self.push_links = PushLinks(self.swarm_key)  # to the next servers of clients' routes (swarm.server.push)
        if self.local_path is not None:
            self._open_model(self.local_path)
        self.files: ServedFiles | None = None
        self.stop_requested = threading.Event()
        self.dht: hivemind.DHT | None = None
        self.transport: TensorServer | None = None
        self.handler: RequestHandler | None = None
        self.span: BlockSpan | None = None
        self.throughput = 0.0
        # Every computation (loading checks, the speed measurement, requests) runs on this one thread.
        # OpenMP (libgomp) keeps a pool of worker threads for each thread that starts parallel work; once a
        # process holds more of them than it has cores, all pools stop spinning between operations, which
        # made a decode step twice as slow with a second computing thread on 2 cores.
        self.compute = ComputeThread(config.batch_wait_ms / 1000, config.max_request_tokens)

    def run(self):
        """Serves until `stop_requested` is set, then leaves the swarm cleanly."""
        try:
            self._start()
            last_announce = last_rebalance = time.monotonic()
            while not self.stop_requested.wait(min(HOUSEKEEPING_PERIOD, self.config.announce_period)):
                self.handler.sessions.close_idle()
                now = time.monotonic()
                if now - last_announce >= self.config.announce_period:
                    last_announce = now
                    self._announce(ServerState.ONLINE)
                    self.files.announce()
                if self._chooses_span and now - last_rebalance >= self.config.rebalance_period:
                    last_rebalance = now
                    self._rebalance()
        finally:
            self._shutdown()

    @property
    def _chooses_span(self) -> bool:
        return self.config.blocks is None and self.config.rebalance_period > 0

    def _open_model(self, path: Path):
        """Reads the configuration of the model at `path` and checks the span asked for against it."""
        self.path = path
        model_config, self.weights_path = load_model_config(path, FAMILIES)
        self.family = family_for(model_config)
        self.model_config = self.family.prepare_config(model_config)
        self.num_blocks = self.family.num_blocks(self.model_config)
        self.residual_dtype = self.family.residual_dtype(self.model_config, self.config.dtype)
        blocks, num_blocks = self.config.blocks, self.config.num_blocks
        if blocks is not None and blocks.end > self.num_blocks:
            raise ConfigurationError(f"blocks {blocks} are outside the model, which has blocks 0:{self.num_blocks}")
        if num_blocks is not None and not 0 < num_blocks <= self.num_blocks:
            raise ConfigurationError(f"--num-blocks must be between 1 and {self.num_blocks}, got {num_blocks}")
        self.checkpoint = CheckpointIndex(self.weights_path)

    def _start(self):
        config = self.config
        raise_open_files_limit()
        self.dht = start_dht(config.initial_peers, host=config.host, port=config.port, swarm_key=self.swarm_key)
        self.visible_maddrs = [str(maddr) for maddr in self.dht.get_visible_maddrs()]
        if config.new_swarm:
            print("To join this swarm, use --initial-peers " + " ".join(self.visible_maddrs), flush=True)
        host = reachable_host(config.host, config.announce_host, self.visible_maddrs)
        self.files = open_served_files(config, self.dht, self.local_path, host)
        if self.local_path is None:
            self._open_model(self.files.path)
        self.transport = TensorServer(config.host, config.transport_port, self._handle, TransportLimits(
            frame_timeout=config.frame_timeout, idle_timeout=config.idle_timeout, max_connections=config.max_connections
        ))  # fmt: skip
        self.address = f"{host}:{config.announce_port or self.transport.port}"
        self.span = self._initial_span()
        self._serve_span(self.span)
        self.transport.start()
        self._log_ready()

    def _log_ready(self):
        logger.info(
            f"ready: serving {self.model_name} blocks {self.span} ({len(self.span)} of {self.num_blocks}) "
            f"at {self.address}, {self._precision()}, {self.throughput:.1f} tokens/s, peer {self.identity.key_id}"
        )

    def _precision(self) -> str:
        quant_type = self.config.quant_type
        return dtype_name(self.config.dtype) + (f" weights in {quant_type}" if quant_type != "none" else "")

    def _initial_span(self) -> BlockSpan:
        """--blocks as given; else the least served --num-blocks blocks; else as many as fit in memory."""
        if self.config.blocks is not None:
            return self.config.blocks
        num_blocks = self.config.num_blocks or self._blocks_that_fit()
        span = choose_span(block_capacities(self._fetch_records()), num_blocks)
        logger.info(f"Chose blocks {span}: the {num_blocks} consecutive blocks the swarm serves least")
        return span

    def _blocks_that_fit(self) -> int:
        block_bytes = max(self._block_bytes(index) for index in range(self.num_blocks))
        if self.config.max_memory is not None:
            max_memory, reserved = self.config.max_memory, 0
        else:
            max_memory, reserved = psutil.virtual_memory().available, PROCESS_RESERVE
        count = blocks_that_fit(max_memory, block_bytes, self.num_blocks, reserved)
        logger.info(f"{count} of {self.num_blocks} blocks ({block_bytes / 2**20:.1f} MiB each) fit in {max_memory / 2**30:.2f} GiB")
        return count

    def _block_bytes(self, index: int) -> int:
        names = self.family.block_tensor_names(self.model_config, index, self.checkpoint.file_of)
        if all(self.checkpoint.file_of[name].is_file() for name in names):
            return self.checkpoint.nbytes(list(names), self.config.dtype)
        return self.files.stored_block_bytes(index)  # not fetched yet: its size as published

    def _fetch_records(self) -> list[list[ServerRecord]]:
        return fetch_records(self.dht, self.model_name, self.num_blocks)

    def _serve_span(self, span: BlockSpan):
        """Announces `span` as joining, loads it, measures it, and starts serving it."""
        self.span, self.throughput = span, 0.0
        self._announce(ServerState.JOINING)
        self.files.fetch_blocks(span)
        loaded = self.compute.submit(self._load_blocks, span).result()
        seconds = self.compute.submit(seconds_per_block, self.family, loaded, self.model_name).result()
        self.throughput = 1.0 / (seconds * len(span))
        sessions = SessionManager(idle_timeout=self.config.session_timeout)
        if self.config.batch_wait_ms > 0 and not rows_independent(loaded.quant_type):
            logger.info(f"Steps of {loaded.quant_type} blocks run each alone: LLM.int8 computes a batch's rows together")
        self.handler = RequestHandler(
            self.family, loaded, sessions, self.model_name, __version__, self._request_limits(), self.compute, self.push_links
        )
        self.transport.limits = self._transport_limits(loaded)
        self._announce(ServerState.ONLINE)

    def _request_limits(self) -> RequestLimits:
        config = self.config
        max_session_length = config.max_session_length or getattr(self.model_config, "max_position_embeddings", 1 << 16)
        cache_memory = config.cache_memory or psutil.virtual_memory().available // 4
        return RequestLimits(
            max_session_length=max_session_length,
            max_request_tokens=config.max_request_tokens,
            max_batch_size=config.max_batch_size,
            max_sessions=config.max_sessions,
            cache_memory=cache_memory,
            busy_wait=config.busy_wait,
        )

    def _transport_limits(self, loaded: LoadedSpan) -> TransportLimits:
        """The configured limits; the largest request by default: `max_request_tokens` rows of each floating-point
        tensor a request may carry besides the hidden states (an encoder's output, the blocks' outputs), 4 of them, in
        float32 (the widest dtype a client may ask them to travel in)."""
        config, max_message_size = self.config, self.config.max_message_size
        if max_message_size is None:
            example = self.family.example_inputs(loaded)
            row_bytes = max(tensor[0].numel() * (4 if tensor.is_floating_point() else tensor.element_size()) for tensor in example.values())
            max_message_size = min(wire.MAX_BODY_BYTES, (1 << 20) + 4 * config.max_request_tokens * row_bytes)
        return TransportLimits(
            max_message_bytes=max_message_size,
            frame_timeout=config.frame_timeout,
            idle_timeout=config.idle_timeout,
            max_connections=config.max_connections,
        )

    def _rebalance(self):
        records = self._fetch_records()
        target = should_move(block_capacities(records, exclude_peer=self.identity.key_id), self.span, self.throughput)
        if target is None:
            return
        logger.info(f"Moving from blocks {self.span} to {target}, which the swarm needs more")
        self.handler.accepting_sessions = False
        self._announce(ServerState.OFFLINE)
        self.handler = None
        self._serve_span(target)
        self._log_ready()

    def _handle(self, fields, tensors, context):
        if fields.get("method") == "hello":
            answer = answer_hello(fields, self.identity, self.swarm_key)
            context.greeted = True
            return answer, {}
        if self.swarm_key is not None and not context.greeted:
            raise AccessDeniedError("this server belongs to a private swarm: a connection starts with hello and its key")
        handler = self.handler
        if handler is None:
            raise ServerUnavailableError("the server is loading its blocks")
        return handler(fields, tensors, context)

    def _load_blocks(self, span: BlockSpan) -> LoadedSpan:
        logger.info(f"Loading blocks {span} of {self.model_name} from {self.weights_path}")
        with tqdm(total=len(span), desc=f"Loading blocks {span}", unit="block") as progress:
            return load_span(
                self.family, self.model_config, self.checkpoint, span, self.config.dtype, self.config.device, progress,
                self.config.quant_type,
            )  # fmt: skip

    def _announce(self, state: ServerState):
        record = ServerRecord.signed(
            self.identity,
            start=self.span.start,
            end=self.span.end,
            state=state,
            throughput=self.throughput if state == ServerState.ONLINE else 0.0,
            version=__version__,
            address=self.address,
            dtype=dtype_name(self.config.dtype),
            quant_type=self.config.quant_type,
            travel_dtype=dtype_name(self.residual_dtype) if self.residual_dtype != self.config.dtype else None,
        )
        if not announce(self.dht, self.model_name, record, self.num_blocks, self.config.record_ttl):
            logger.warning(f"Could not store every record of blocks {self.span} in the DHT")

    def _shutdown(self):
        handler = self.handler
        if handler is not None:
            handler.accepting_sessions = False
        if self.dht is not None and self.dht.is_alive() and self.span is not None:
            try:
                self._announce(ServerState.OFFLINE)
            except Exception as error:
                logger.warning(f"Could not announce going offline: {error}")
        if self.transport is not None:
            deadline = time.monotonic() + self.config.shutdown_grace
            while handler is not None and len(handler.sessions) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.transport.stop()
        self.push_links.close()
        if self.files is not None:
            self.files.close()
        if self.dht is not None:
            self.dht.shutdown()
        self.compute.shutdown(wait=False, cancel_futures=True)
        logger.info(f"Server of {self.model_name} blocks {self.span} stopped")
