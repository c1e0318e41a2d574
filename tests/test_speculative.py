"""Assisted decoding through the swarm: transformers' prompt lookup and draft-model (speculative) decoding run
unchanged on a distributed model. Each step sends the draft tokens through the servers at once; the servers drop
the ones not accepted (`crop`), and the tokens and logits equal the local model's, with push and with relay, when a
server dies mid-generation, with speculative sampling, and for models whose layers attend through a sliding window
(whose caches keep a step's positions past the window until the next step, for its crop)."""

from __future__ import annotations

import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from swarm import AutoDistributedModel
from swarm.client.config import ClientConfig
from swarm.client.retry import RetryPolicy
from swarm.client.session import InferenceSession
from swarm.errors import BadRequestError
from swarm.launch import LocalSwarm
from swarm.transport import Connection
from tests.conftest import assert_same_generation, served_model
from tests.test_architectures import SPANS, VOCAB, WINDOW, make_model
from tests.test_failover import ActAtToken

PROMPT = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])  # repetitive: prompt lookup finds drafts


@pytest.fixture(scope="module")
def swarm_4(tiny_llama, tmp_path_factory):
    """Blocks 0:2, 2:4 twice, 4:5: the route has three hops and its middle one a replica."""
    with LocalSwarm(tiny_llama, ["0:2", "2:4", "2:4", "4:5"], log_dir=tmp_path_factory.mktemp("logs")) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def draft_model(local_tiny_llama):
    """A smaller Llama with the same vocabulary and other weights: many of its drafts are rejected."""
    torch.manual_seed(1)
    config = LlamaConfig(**{**local_tiny_llama.config.to_dict(), "num_hidden_layers": 2, "hidden_size": 24, "intermediate_size": 40,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6})  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["mistral", "gemma3_text"])
def sliding(request, tmp_path_factory, bootstrap_peers):
    """(distributed model, local model) of an architecture with sliding-window layers (every layer: Mistral; every
    other one: Gemma 3), its window shorter than the prompt, served by two servers."""
    directory = make_model(tmp_path_factory.mktemp("models") / f"tiny-{request.param}", request.param)
    local = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with served_model(directory, SPANS, bootstrap_peers, tmp_path_factory.mktemp("logs")) as model:
        yield model, local


@pytest.fixture(scope="module")
def sliding_draft():
    """A Llama of the sliding-window models' vocabulary, whose drafts they mostly reject."""
    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    config.initializer_range = 0.2
    return LlamaForCausalLM(config).eval()


def connect(tiny_llama, swarm, **config) -> AutoDistributedModel:
    retry = RetryPolicy(max_attempts=5, base_delay=0.05, total_timeout=20)
    return AutoDistributedModel.from_pretrained(tiny_llama, client_config=ClientConfig(initial_peers=swarm.initial_peers, retry=retry, **config))


def both(model, local, **assisted):
    """The swarm's assisted generation and the local model's plain greedy one."""
    settings = dict(max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return model.generate(PROMPT, **settings, **assisted), local.generate(PROMPT, **settings)


@pytest.mark.parametrize("push", [True, False], ids=["push", "relay"])
def test_prompt_lookup_gives_the_local_models_tokens_and_logits(swarm_4, tiny_llama, local_tiny_llama, push):
    model = connect(tiny_llama, swarm_4, push=push)
    try:
        remote, expected = both(model, local_tiny_llama, prompt_lookup_num_tokens=4)
        assert_same_generation(remote, expected)
    finally:
        model.remote.shutdown()


def test_a_draft_model_whose_drafts_are_often_rejected(swarm_4, tiny_llama, local_tiny_llama, draft_model, monkeypatch):
    model = connect(tiny_llama, swarm_4)
    dropped = []
    crop = InferenceSession.crop

    def counting_crop(session, length):
        dropped.append(session.position - length)
        crop(session, length)

    monkeypatch.setattr(InferenceSession, "crop", counting_crop)
    try:
        remote, expected = both(model, local_tiny_llama, assistant_model=draft_model)
        assert_same_generation(remote, expected)
        assert sum(count > 0 for count in dropped) >= 2, f"the draft model's drafts were hardly ever rejected: {dropped}"
    finally:
        model.remote.shutdown()


def counted_crops(monkeypatch) -> list[int]:
    """The number of positions each crop of an inference session drops, from now on."""
    dropped, crop = [], InferenceSession.crop

    def counting_crop(session, length):
        dropped.append(session.position - length)
        crop(session, length)

    monkeypatch.setattr(InferenceSession, "crop", counting_crop)
    return dropped


@pytest.mark.parametrize("assisted", ["prompt lookup", "draft model"])
def test_assisted_decoding_through_sliding_windows_gives_the_local_models_tokens(sliding, sliding_draft, assisted, monkeypatch):
    model, local = sliding
    assert PROMPT.shape[1] > WINDOW  # every crop drops positions that a plain sliding-window cache would have let go
    dropped = counted_crops(monkeypatch)
    assistance = {"prompt_lookup_num_tokens": 4} if assisted == "prompt lookup" else {"assistant_model": sliding_draft}
    remote, expected = both(model, local, **assistance)
    assert_same_generation(remote, expected)
    assert sum(count > 0 for count in dropped) >= 2, f"the drafts were hardly ever rejected: {dropped}"


def test_a_sliding_window_crop_past_the_last_step_is_refused_by_name(sliding):
    model, _ = sliding
    with model.inference_session(max_length=32) as session:
        model.generate(PROMPT, max_new_tokens=3, do_sample=False)  # then a step of one token
        connection = Connection(session.route[0].server.address, 10)
        session_id = session._server_sessions[0].session_id
        hidden = torch.zeros(1, 1, model.config.hidden_size)
        try:
            with pytest.raises(BadRequestError, match="sliding-window caches can drop the last 1 positions .the last step's., not 2"):
                connection.request({"method": "step", "session_id": session_id, "crop": session.position - 2}, {"hidden_states": hidden})
        finally:
            connection.close()
        model.generate(None, max_new_tokens=2, do_sample=False)  # the session goes on


def test_speculative_sampling_gives_the_local_models_tokens(swarm_4, tiny_llama, local_tiny_llama, draft_model):
    model = connect(tiny_llama, swarm_4)
    try:
        settings = dict(max_new_tokens=16, do_sample=True, top_k=30, assistant_model=draft_model)
        torch.manual_seed(4)
        remote = model.generate(PROMPT, **settings)
        torch.manual_seed(4)
        assert torch.equal(remote, local_tiny_llama.generate(PROMPT, **settings))
    finally:
        model.remote.shutdown()


def test_a_crop_past_the_session_is_refused_by_name(swarm_4, tiny_llama):
    model = connect(tiny_llama, swarm_4, push=False)
    try:
        with model.inference_session(max_length=16) as session:
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
            hop = session.route[0]
            connection = Connection(hop.server.address, 10)
            hidden = torch.zeros(1, 1, model.config.hidden_size)
            session_id = session._server_sessions[0].session_id
            with pytest.raises(BadRequestError, match="crop must be between 0 and the session's 4 positions, got 9"):
                connection.request({"method": "step", "session_id": session_id, "crop": 9}, {"hidden_states": hidden})
            connection.close()
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)  # the session goes on
    finally:
        model.remote.shutdown()


def test_a_server_killed_mid_assisted_decoding_keeps_the_output(swarm_4, tiny_llama, local_tiny_llama):
    """Runs last: it kills the middle hop's server, whose replacement replays the cropped history."""
    model = connect(tiny_llama, swarm_4)
    try:
        expected = local_tiny_llama.generate(PROMPT, max_new_tokens=24, do_sample=False)
        with model.inference_session(max_length=64) as session:
            victim = next(server for server in swarm_4.servers if server.address == session.route[1].server.address)
            result = model.generate(PROMPT, max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=4,
                                    streamer=ActAtToken(3, lambda: victim.signal(signal.SIGKILL)))  # fmt: skip
            assert victim.process.wait(5) is not None and session.route[1].server.address != victim.address
    finally:
        model.remote.shutdown()
    assert torch.equal(result, expected)
