"""The request handler runs every computation on the server's one compute thread, whichever connection asks,
and sends its reply from there."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from swarm.checkpoint import CheckpointIndex, load_model_config
from swarm.models import FAMILIES
from swarm.models.base import load_span
from swarm.models.llama import LlamaFamily
from swarm.server.handlers import RequestHandler
from swarm.server.sessions import SessionManager
from swarm.spans import BlockSpan
from swarm.transport import ConnectionContext


class RecordingContext(ConnectionContext):
    def __init__(self):
        super().__init__("test")
        self.replies = []

    def reply(self, fields, tensors=None):
        self.replies.append((threading.current_thread().name, fields))
        return True


class RecordingLlama(LlamaFamily):
    def __init__(self):
        self.threads = []

    def forward(self, *args, **kwargs):
        self.threads.append((threading.current_thread().name, torch.is_inference_mode_enabled()))
        return super().forward(*args, **kwargs)


def test_requests_from_several_connections_compute_on_one_thread(tiny_llama):
    family = RecordingLlama()
    config, weights = load_model_config(tiny_llama, FAMILIES)
    config = family.prepare_config(config)
    span = BlockSpan(0, 3)
    compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
    try:
        checkpoint = CheckpointIndex(weights)
        loaded = compute.submit(load_span, family, config, checkpoint, span, torch.float32, "cpu").result()
        handler = RequestHandler(family, loaded, SessionManager(60), "tiny", "0", 64, compute)
        family.threads.clear()
        hidden = torch.randn(1, 4, config.hidden_size)
        errors = []

        def client():
            try:
                run_requests()
            except Exception as error:
                errors.append(error)

        def run_requests():
            context = RecordingContext()
            assert handler({"method": "forward", "start": 0, "end": 3}, {"hidden_states": hidden}, context) is None
            session = handler({"method": "open", "start": 0, "end": 3, "max_length": 8}, {}, context)[0]
            assert handler({"method": "step", **session}, {"hidden_states": hidden}, context) is None
            assert context.replies == [("compute_0", {}), ("compute_0", {"length": 4})]

        clients = [threading.Thread(target=client) for _ in range(3)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=60)
    finally:
        compute.shutdown()
    assert not errors
    assert len(family.threads) == 6
    assert {name for name, _ in family.threads} == {"compute_0"}
    assert all(inference for _, inference in family.threads)
