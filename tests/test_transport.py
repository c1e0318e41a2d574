"""How a connection waits for a frame (`swarm.transport.FrameReader`), on a real socket pair: after a short wait it
keeps asking for the next bytes for a while instead of sleeping, after a long one it sleeps at once; frames arrive
whole either way, and a peer that closes while it waits is noticed."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from swarm import wire
from swarm.transport import FrameReader, TransportLimits

SPIN = 0.2  # seconds the reader under test spins: far longer than the scheduling noise of a busy machine
LATE = 0.1  # seconds after the reader starts waiting that a frame is sent, within SPIN


@pytest.fixture
def pair():
    reader_end, writer_end = socket.socketpair()
    yield reader_end, writer_end
    reader_end.close()
    writer_end.close()


def send_later(sock: socket.socket, delay: float, tensor: torch.Tensor) -> threading.Thread:
    def send():
        time.sleep(delay)
        sock.sendmsg(wire.encode({"step": delay}, {"x": tensor}))

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def receive_timed(reader: FrameReader, sender: threading.Thread) -> tuple[dict, dict, float]:
    """A frame, and the CPU seconds this thread spent waiting for it."""
    started = time.thread_time()
    fields, tensors = reader.receive(TransportLimits(frame_timeout=10))
    cpu = time.thread_time() - started
    sender.join()
    return fields, tensors, cpu


def test_a_reader_spins_after_a_short_wait_and_sleeps_after_a_long_one(pair):
    reader_end, writer_end = pair
    reader = FrameReader(reader_end, spin=SPIN)
    tensor = torch.randn(1, 1, 576)

    _, _, first = receive_timed(reader, send_later(writer_end, LATE, tensor))  # the first wait spins
    _, _, after_long = receive_timed(reader, send_later(writer_end, SPIN + 0.2, tensor))  # spins, then sleeps
    _, _, sleeping = receive_timed(reader, send_later(writer_end, LATE, tensor))  # sleeps: the last wait was long
    fields, tensors, spinning = receive_timed(reader, send_later(writer_end, LATE, tensor))  # spins again

    assert first > LATE / 4 and spinning > LATE / 4, (first, spinning)
    assert sleeping < LATE / 10, sleeping
    assert after_long < SPIN + 0.1, after_long
    assert fields == {"step": LATE} and torch.equal(tensors["x"], tensor)


def test_a_reader_that_does_not_spin_sleeps_at_once(pair):
    reader_end, writer_end = pair
    _, tensors, cpu = receive_timed(FrameReader(reader_end, spin=0.0), send_later(writer_end, LATE, torch.ones(3)))
    assert cpu < LATE / 10, cpu
    assert torch.equal(tensors["x"], torch.ones(3))


def test_a_peer_closing_while_the_reader_spins_is_noticed(pair):
    reader_end, writer_end = pair
    reader = FrameReader(reader_end, spin=SPIN)
    closer = threading.Timer(LATE, writer_end.shutdown, args=(socket.SHUT_WR,))
    closer.start()
    with pytest.raises(ConnectionError, match="closed by peer"):
        reader.receive(TransportLimits(frame_timeout=10))
    closer.join()
