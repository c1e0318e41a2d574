"""Llama through real servers on 127.0.0.1 against the local Hugging Face model: exact tokens, logits within 1e-4."""

from __future__ import annotations

import threading

import pytest
import torch

from swarm import AutoDistributedModel
from swarm.errors import UnsupportedModelError
from swarm.launch import LocalSwarm
from tests.conftest import ATOL, assert_padded_batch_matches, assert_same_generation, generate_both


@pytest.fixture(scope="module")
def llama_swarm_2(tiny_llama, tmp_path_factory):
    with LocalSwarm(tiny_llama, ["0:3", "3:5"], log_dir=tmp_path_factory.mktemp("logs")) as swarm:
        yield swarm


def connect(model_dir, swarm):
    return AutoDistributedModel.from_pretrained(model_dir, initial_peers=swarm.initial_peers, coverage_timeout=30)


@pytest.fixture(scope="module")
def model_3(tiny_llama, llama_swarm_3):
    model = connect(tiny_llama, llama_swarm_3)
    yield model
    model.remote.shutdown()


def random_ids(batch, length, seed=1):
    return torch.randint(3, 131, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("swarm_fixture", ["llama_swarm_2", "llama_swarm_3"])
def test_greedy_and_logits_match_local(swarm_fixture, tiny_llama, local_tiny_llama, request):
    swarm = request.getfixturevalue(swarm_fixture)
    model = connect(tiny_llama, swarm)
    try:
        input_ids = random_ids(1, 9)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids).logits, local_tiny_llama(input_ids).logits, atol=ATOL, rtol=0)
        remote, local = generate_both(model, local_tiny_llama, input_ids)
        assert_same_generation(remote, local)
        assert len(set(remote.sequences[0, 9:].tolist())) > 2, "the test model should not repeat one token"
    finally:
        model.remote.shutdown()


def test_left_padded_batch(model_3, local_tiny_llama):
    assert_padded_batch_matches(model_3, local_tiny_llama, random_ids(3, 8, seed=2))


def test_seeded_sampling_matches_local(model_3, local_tiny_llama):
    input_ids = random_ids(2, 5, seed=3)
    settings = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=15)
    torch.manual_seed(123)
    remote = model_3.generate(input_ids, **settings)
    torch.manual_seed(123)
    local = local_tiny_llama.generate(input_ids, **settings)
    assert torch.equal(remote, local)
    torch.manual_seed(124)
    assert not torch.equal(model_3.generate(input_ids, **settings), remote), "another seed should sample otherwise"


def test_eos_stops_generation(model_3, local_tiny_llama):
    input_ids = random_ids(1, 6, seed=4)
    free = local_tiny_llama.generate(input_ids, max_new_tokens=6)
    eos = int(free[0, 8])
    remote = model_3.generate(input_ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    local = local_tiny_llama.generate(input_ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(remote, local)
    assert remote.shape[1] <= 9


def test_prompt_longer_than_512_tokens(model_3, local_tiny_llama):
    input_ids = random_ids(1, 600, seed=5)
    remote, local = generate_both(model_3, local_tiny_llama, input_ids, max_new_tokens=5)
    assert_same_generation(remote, local)


def test_streamer_receives_every_token(model_3, local_tiny_llama):
    class Collector:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    streamer = Collector()
    input_ids = random_ids(1, 4, seed=6)
    output = model_3.generate(input_ids, max_new_tokens=5, streamer=streamer)
    assert streamer.chunks[-1] is None
    streamed = torch.cat([chunk.reshape(1, -1) for chunk in streamer.chunks[:-1]], dim=1)
    assert torch.equal(streamed, output)


def test_multi_turn_session_continues_without_resending(model_3, local_tiny_llama):
    first_turn, second_turn = random_ids(1, 6, seed=7), random_ids(1, 4, seed=8)
    with model_3.inference_session(max_length=64) as session:
        first = model_3.generate(first_turn, max_new_tokens=5)
        sent_before_second = session.position
        second = model_3.generate(second_turn, max_new_tokens=5)
        third = model_3.generate(None, max_new_tokens=3)
    assert sent_before_second == first.shape[1] - 1
    conversation = torch.cat([first, second_turn], dim=1)
    local_second = local_tiny_llama.generate(conversation, max_new_tokens=5)
    assert torch.equal(second, local_second[:, first.shape[1] :])
    local_third = local_tiny_llama.generate(local_second, max_new_tokens=3)
    assert torch.equal(third, local_third[:, local_second.shape[1] :])


def test_session_accepts_whole_conversation(model_3, local_tiny_llama):
    prompt = random_ids(1, 5, seed=9)
    with model_3.inference_session(max_length=40):
        first = model_3.generate(prompt, max_new_tokens=4)
        follow_up = torch.cat([first, random_ids(1, 3, seed=10)], dim=1)
        second = model_3.generate(follow_up, max_new_tokens=4)
    assert torch.equal(second, local_tiny_llama.generate(follow_up, max_new_tokens=4))


def test_two_clients_generate_at_once(tiny_llama, llama_swarm_3, local_tiny_llama):
    prompts = [random_ids(1, 7, seed=11), random_ids(2, 5, seed=12)]
    expected = [local_tiny_llama.generate(prompt, max_new_tokens=20) for prompt in prompts]
    models = [connect(tiny_llama, llama_swarm_3) for _ in prompts]
    results, errors = [None, None], []

    def run(index):
        try:
            results[index] = models[index].generate(prompts[index], max_new_tokens=20)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        for model in models:
            model.remote.shutdown()
    assert not errors, errors
    for result, reference in zip(results, expected):
        assert torch.equal(result, reference)


def test_beam_search_matches_local(model_3, local_tiny_llama):
    input_ids = random_ids(2, 6, seed=13)
    settings = dict(num_beams=3, max_new_tokens=8, num_return_sequences=2, early_stopping=True)
    assert torch.equal(model_3.generate(input_ids, **settings), local_tiny_llama.generate(input_ids, **settings))


def test_hidden_states_match_local(model_3, local_tiny_llama):
    """`output_hidden_states` without a session: every layer's output comes back from the server that ran it; one
    selected by index comes back alone. In a session the swarm says it does not return them."""
    input_ids = random_ids(2, 6, seed=9)
    with torch.no_grad():
        remote = model_3(input_ids, output_hidden_states=True, use_cache=False).hidden_states
        expected = local_tiny_llama(input_ids, output_hidden_states=True, use_cache=False).hidden_states
        assert len(remote) == len(expected)
        for got, want in zip(remote, expected):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        selected = model_3(input_ids, output_hidden_states=[2], use_cache=False).hidden_states
        torch.testing.assert_close(selected[2], expected[2], atol=ATOL, rtol=0)
        assert all(state is None for index, state in enumerate(selected) if index != 2)
        with model_3.inference_session(max_length=8), pytest.raises(UnsupportedModelError, match="inference session"):
            model_3(input_ids, output_hidden_states=True)
