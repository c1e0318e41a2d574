"""The request handler runs every computation on the server's one compute thread, whichever connection asks."""

from __future__ import annotations

import threading

import torch

from swarm.checkpoint import CheckpointIndex, load_model_config
from swarm.models import FAMILIES, FAST_PATHS
from swarm.models.base import load_span
from swarm.models.decoder import DecoderFamily
from swarm.server.batching import ComputeThread
from swarm.server.handlers import RequestHandler, RequestLimits
from swarm.server.sessions import SessionManager
from swarm.spans import BlockSpan
from swarm.transport import Connection, TensorServer


class RecordingLlama(DecoderFamily):
    def __init__(self):
        super().__init__(fast_paths=FAST_PATHS)
        self.threads = []

    def forward(self, *args, **kwargs):
        self.threads.append((threading.current_thread().name, torch.is_inference_mode_enabled()))
        return super().forward(*args, **kwargs)


def test_requests_from_several_connections_compute_on_one_thread(tiny_llama):
    family = RecordingLlama()
    config, weights = load_model_config(tiny_llama, FAMILIES)
    config = family.prepare_config(config)
    span = BlockSpan(0, 3)
    compute = ComputeThread(name="compute")
    server = None
    try:
        checkpoint = CheckpointIndex(weights)
        loaded = compute.submit(load_span, family, config, checkpoint, span, torch.float32, "cpu").result()
        family.threads.clear()
        handler = RequestHandler(family, loaded, SessionManager(60), "tiny", "0", RequestLimits(max_session_length=64), compute)
        server = TensorServer("127.0.0.1", 0, handler).start()
        hidden = torch.randn(1, 4, config.hidden_size)
        expected = torch.inference_mode()(family.forward)(loaded, span, {"hidden_states": hidden}, None, None)
        family.threads.clear()
        errors = []

        def client():
            try:
                with_requests(Connection(f"127.0.0.1:{server.port}", timeout=30))
            except Exception as error:
                errors.append(error)

        def with_requests(connection):
            _, outputs = connection.request({"method": "forward", "start": 0, "end": 3}, {"hidden_states": hidden})
            assert torch.equal(outputs["hidden_states"], expected["hidden_states"])
            session, _ = connection.request({"method": "open", "start": 0, "end": 3, "max_length": 8})
            reply, outputs = connection.request({"method": "step", **session}, {"hidden_states": hidden})
            assert reply["length"] == 4 and torch.equal(outputs["hidden_states"], expected["hidden_states"])
            connection.close()

        clients = [threading.Thread(target=client) for _ in range(3)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=60)
    finally:
        if server is not None:
            server.stop()
        compute.shutdown()
    assert not errors
    assert len(family.threads) == 6
    assert {name for name, _ in family.threads} == {"compute"}
    assert all(inference for _, inference in family.threads)
