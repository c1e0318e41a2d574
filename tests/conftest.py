"""Shared fixtures: tiny random checkpoints saved to disk, and real swarms of processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import psutil
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swarm import AutoDistributedModel
from swarm.launch import LocalSwarm, preload_peers, start_bootstrap
from swarm.transport import Connection

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
preload_peers()  # the suite starts hundreds of peers: each forks from one process that imported torch once

ATOL = 1e-4  # logits through the swarm vs. the local model, float32


def generate_both(model, local, input_ids, **kwargs):
    kwargs = {"max_new_tokens": 12, "output_logits": True, "return_dict_in_generate": True, **kwargs}
    return model.generate(input_ids, **kwargs), local.generate(input_ids, **kwargs)


def assert_same_generation(remote, local):
    assert torch.equal(remote.sequences, local.sequences), (remote.sequences, local.sequences)
    assert len(remote.logits) == len(local.logits)
    for remote_logits, local_logits in zip(remote.logits, local.logits):
        torch.testing.assert_close(remote_logits, local_logits, atol=ATOL, rtol=0)


def assert_padded_batch_matches(model, local, input_ids, **generate_kwargs):
    """Left-pads rows 0 and 2 of `input_ids` (by 3 and 1 tokens), then compares the logits of every position and a
    generation with the local model."""
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    attention_mask[2, :1] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    with torch.no_grad():
        remote_logits = model(input_ids, attention_mask=attention_mask).logits
        local_logits = local(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(remote_logits, local_logits, atol=ATOL, rtol=0)
    remote, expected = generate_both(model, local, input_ids, attention_mask=attention_mask, **generate_kwargs)
    assert_same_generation(remote, expected)


@contextlib.contextmanager
def served_model(directory, spans, initial_peers, log_dir):
    """The client of the model at `directory`, served by one server per span in the DHT of `initial_peers`; the
    client and the servers end on exit."""
    with LocalSwarm(directory, spans, log_dir=log_dir, initial_peers=initial_peers) as swarm:
        model = AutoDistributedModel.from_pretrained(directory, initial_peers=swarm.initial_peers, coverage_timeout=30)
        try:
            yield model
        finally:
            model.remote.shutdown()


def make_tiny_llama(directory, **overrides):
    """A random Llama with uneven dimensions and grouped KV heads whose greedy tokens vary."""
    settings = dict(
        vocab_size=131,
        hidden_size=60,
        intermediate_size=97,
        num_hidden_layers=5,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    settings.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def local_tiny_llama(tiny_llama):
    return LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llama_swarm_3(tiny_llama, tmp_path_factory):
    """Three servers with uneven spans."""
    with LocalSwarm(tiny_llama, ["0:1", "1:4", "4:5"], log_dir=tmp_path_factory.mktemp("logs")) as swarm:
        yield swarm


@pytest.fixture(scope="session")
def bootstrap_peers(tmp_path_factory):
    """One bootstrap DHT peer that swarms of different models share (each joins it instead of starting its own)."""
    peer, initial_peers = start_bootstrap(log_path=tmp_path_factory.mktemp("logs") / "shared-bootstrap.log")
    yield initial_peers
    peer.stop()


@pytest.fixture(autouse=True, scope="session")
def reap_children():
    """Kills any swarm server, DHT peer or p2pd daemon a test left behind (and nothing else: killing
    torch's shared-memory helper would abort this process)."""
    yield
    for child in psutil.Process().children(recursive=True):
        try:
            if any(name in " ".join(child.cmdline()) for name in ("swarm.server", "swarm.dht", "p2pd")):
                child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def server_info(address: str) -> dict:
    connection = Connection(address, timeout=30)
    try:
        return connection.request({"method": "info"})[0]
    finally:
        connection.close()


def generate_concurrently(model, jobs: dict, *others: threading.Thread) -> dict:
    """Runs `model.generate(input_ids, **kwargs)` for every job (name -> (input_ids, kwargs)) in a thread of its
    own, beside `others`; returns each job's output once all have ended, or raises if any failed."""
    outputs, errors = {}, []

    def generate(name, input_ids, kwargs):
        try:
            outputs[name] = model.generate(input_ids, output_logits=True, return_dict_in_generate=True, **kwargs)
        except Exception as error:
            errors.append((name, error))

    threads = [threading.Thread(target=generate, args=(name, *job)) for name, job in jobs.items()] + list(others)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not errors and not any(thread.is_alive() for thread in threads), errors
    return outputs
