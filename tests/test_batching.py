"""Continuous batching: steps of different sessions run as one forward give what each gives alone.

The compute thread's scheduling and the family's math are tested here without a network (`forward_batch`
against `forward`, session by session); the server's batching of steps from concurrent clients is tested through
real servers further down.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

from swarm import AutoDistributedModel
from swarm.checkpoint import CheckpointIndex, load_model_config
from swarm.client.joining import JoinedCalls, join_concurrent_calls
from swarm.errors import BadRequestError
from swarm.launch import LocalSwarm
from swarm.models import FAMILIES, family_for
from swarm.models.base import load_span
from swarm.server.batching import ComputeThread
from swarm.spans import BlockSpan
from swarm.transport import Connection
from tests.conftest import ATOL, assert_same_generation, generate_concurrently, server_info
from tests.test_architectures import ARCHITECTURES, make_model
from tests.test_fast_path import load
from tests.test_mixtral import make_tiny_mixtral
from tests.test_t5 import fresh_cache, make_tiny_t5
from tests.test_text_to_speech import make_tiny_speecht5
from tests.test_whisper import make_tiny_whisper

SPAN = BlockSpan(1, 4)


class Recorder:
    """Runs of steps, alone or together, as a compute thread makes them."""

    def __init__(self):
        self.runs: list[list[str]] = []

    def alone(self, name: str):
        return lambda: self.runs.append([name]) or name

    def together(self, names: list[str]) -> list:
        self.runs.append(list(names))
        return [ValueError(f"{name} is faulty") if name.startswith("faulty") else name for name in names]


def blocked(compute: ComputeThread) -> threading.Event:
    """Keeps `compute` busy until the returned event is set."""
    release = threading.Event()
    compute.submit(release.wait, 30)
    return release


def test_steps_queued_together_run_together_one_per_session_and_key():
    compute, recorder = ComputeThread(batch_wait=0.05), Recorder()
    try:
        release = blocked(compute)
        steps = [("a", "key", "s1"), ("b", "key", "s2"), ("c", "other", "s3"), ("d", "key", "s1"), ("faulty e", "key", "s4")]
        futures = {name: compute.submit_batchable(key, member, 1, name, recorder.alone(name), recorder.together)
                   for name, key, member in steps}  # fmt: skip
        plain = compute.submit(lambda: "plain")
        release.set()
        assert [futures[name].result(10) for name in "abcd"] == list("abcd") and plain.result(10) == "plain"
        with pytest.raises(ValueError, match="faulty e is faulty"):
            futures["faulty e"].result(10)
    finally:
        compute.shutdown()
    assert recorder.runs[0] == ["a", "b", "faulty e"]  # d waits for its session's step a; c has another key
    assert sorted(map(tuple, recorder.runs[1:])) == [("c",), ("d",)]
    assert (compute.batches, compute.batched_steps) == (1, 3)


def test_busy_seconds_count_running_not_waiting():
    compute, recorder = ComputeThread(batch_wait=5.0), Recorder()
    try:
        compute.submit(time.sleep, 0.2).result(10)
        time.sleep(0.3)  # idle
        release = blocked(compute)
        first = [compute.submit_batchable("key", member, 1, member, recorder.alone(member), recorder.together) for member in "xy"]
        release.set()
        for future in first:
            future.result(10)
        future = compute.submit_batchable("key", "x", 1, "x", recorder.alone("x"), recorder.together)
        time.sleep(0.3)  # the thread waits for y's step to batch it with x's
        compute.submit_batchable("key", "y", 1, "y", recorder.alone("y"), recorder.together).result(10)
        future.result(10)
    finally:
        compute.shutdown()
    assert recorder.runs == [["x", "y"], ["x", "y"]]
    assert 0.2 <= compute.busy_seconds < 0.4, compute.busy_seconds


def test_a_session_alone_never_waits_and_a_batch_waits_for_its_sessions():
    compute, recorder = ComputeThread(batch_wait=5.0), Recorder()
    try:
        started = time.monotonic()
        for step in range(3):
            compute.submit_batchable("solo key", "solo", 1, step, recorder.alone(step), recorder.together).result(10)
        assert time.monotonic() - started < 2.0, "a session alone waited for nobody"
        release = blocked(compute)
        first = [compute.submit_batchable("key", member, 1, member, recorder.alone(member), recorder.together) for member in ("x", "y")]
        release.set()
        for future in first:
            future.result(10)
        future = compute.submit_batchable("key", "x", 1, "x again", recorder.alone("x again"), recorder.together)
        time.sleep(0.3)  # the thread waits for y, which ran in x's batch
        assert not future.done()
        compute.submit_batchable("key", "y", 1, "y again", recorder.alone("y again"), recorder.together).result(10)
    finally:
        compute.shutdown()
    assert recorder.runs == [[0], [1], [2], ["x", "y"], ["x again", "y again"]]
    compute_off = ComputeThread(batch_wait=0.0)
    try:
        release = blocked(compute_off)
        futures = [compute_off.submit_batchable("key", member, 1, member, recorder.alone(member), recorder.together) for member in "pq"]
        release.set()
        assert [future.result(10) for future in futures] == ["p", "q"]
    finally:
        compute_off.shutdown()
    assert recorder.runs[-2:] == [["p"], ["q"]]


@pytest.fixture(scope="module")
def llama_span(tiny_llama):
    return load(tiny_llama, SPAN)


def prefilled(family, loaded, generator, batch: int, tokens: int, mask=None):
    """A session on `SPAN` that has run a prefill of `tokens` positions for `batch` rows."""
    state = family.new_session_state(loaded, SPAN, max_length=64)
    inputs = {"hidden_states": torch.randn(batch, tokens, loaded.config.hidden_size, generator=generator)}
    if mask is not None:
        inputs["attention_mask"] = mask
    with torch.inference_mode():
        family.forward(loaded, SPAN, inputs, state, None)
    return state


def step_inputs(loaded, generator, batch: int, tokens: int = 1, **extra) -> dict[str, torch.Tensor]:
    return {"hidden_states": torch.randn(batch, tokens, loaded.config.hidden_size, generator=generator), **extra}


def assert_batch_matches_alone(family, loaded, steps, steps_after: int = 1, span: BlockSpan = SPAN):
    """Runs `steps` ([(inputs, state)]) as one batch and each alone on a copy of its state: same outputs (within
    ATOL), same lengths and masks, and the `steps_after` steps after each give the same again."""
    alone_states = [copy.deepcopy(state) for _, state in steps]
    with torch.inference_mode():
        batched = family.forward_batch(loaded, span, steps)
        alone = [family.forward(loaded, span, inputs, state, None) for (inputs, _), state in zip(steps, alone_states)]
    for outputs, expected, (_, state), alone_state in zip(batched, alone, steps, alone_states):
        assert outputs.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(outputs[name], expected[name], atol=ATOL, rtol=0)
        assert state.length == alone_state.length and state.batch_size == alone_state.batch_size
        assert (state.attention_mask is None) == (alone_state.attention_mask is None)
        if state.attention_mask is not None:
            assert torch.equal(state.attention_mask, alone_state.attention_mask)
    generator = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        for (_, state), alone_state in zip(steps, alone_states):
            for _ in range(steps_after):
                inputs = step_inputs(loaded, generator, state.batch_size)
                after, expected = family.forward(loaded, span, inputs, state, None), family.forward(loaded, span, inputs, alone_state, None)
                torch.testing.assert_close(after["hidden_states"], expected["hidden_states"], atol=ATOL, rtol=0)


def test_sessions_of_different_lengths_masks_and_beams_batch_exactly(llama_span):
    family, loaded = llama_span
    generator = torch.Generator().manual_seed(0)
    padded = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    states = [
        prefilled(family, loaded, generator, 1, 9),
        prefilled(family, loaded, generator, 2, 6, mask=padded),
        prefilled(family, loaded, generator, 3, 3),
        prefilled(family, loaded, generator, 1, 9),
    ]
    steps = [
        (step_inputs(loaded, generator, 1), states[0]),
        (step_inputs(loaded, generator, 2, attention_mask=torch.tensor([[1], [1]]), hypo_ids=torch.tensor([1, 0])), states[1]),
        (step_inputs(loaded, generator, 3, hypo_ids=torch.tensor([2, 2, 0]), position_ids=torch.tensor([[3], [3], [3]])), states[2]),
        (step_inputs(loaded, generator, 1, output_layers=torch.tensor([2])), states[3]),
    ]
    keys = {family.batch_key(loaded, SPAN, inputs, state, None) for inputs, state in steps}
    assert keys == {(SPAN, 1)}
    assert_batch_matches_alone(family, loaded, steps)


def test_a_new_session_and_several_tokens_batch_too(llama_span):
    family, loaded = llama_span
    generator = torch.Generator().manual_seed(1)
    fresh = family.new_session_state(loaded, SPAN, max_length=64)
    steps = [
        (step_inputs(loaded, generator, 2, tokens=3), fresh),
        (step_inputs(loaded, generator, 1, tokens=3), prefilled(family, loaded, generator, 1, 5)),
    ]
    assert_batch_matches_alone(family, loaded, steps)


def test_sessions_of_equal_lengths_batch_without_a_mask(llama_span):
    family, loaded = llama_span
    generator = torch.Generator().manual_seed(2)
    steps = [(step_inputs(loaded, generator, 1), prefilled(family, loaded, generator, 1, 4)) for _ in range(3)]
    assert_batch_matches_alone(family, loaded, steps)


def load_architecture(directory, name: str, **overrides):
    config, weights = load_model_config(make_model(directory, name, **overrides), FAMILIES)
    family = family_for(config)
    config = family.prepare_config(config)  # with the attention implementation a server would use
    return family, load_span(family, config, CheckpointIndex(weights), SPAN, torch.float32, "cpu")


def three_sessions(family, loaded, generator) -> list:
    """Steps of three sessions on `SPAN`: 9 positions, 6 of which one row's first 2 are padding (with beams), 3."""
    padded = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    states = [prefilled(family, loaded, generator, 1, 9), prefilled(family, loaded, generator, 2, 6, mask=padded),
              prefilled(family, loaded, generator, 1, 3)]  # fmt: skip
    return [(step_inputs(loaded, generator, 1), states[0]), (step_inputs(loaded, generator, 2, hypo_ids=torch.tensor([1, 0])), states[1]),
            (step_inputs(loaded, generator, 1), states[2])]  # fmt: skip


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_decoder_architecture_batches_exactly(name, tmp_path):
    """Sessions of different lengths (past the sliding windows of the architectures that have one), one left-padded
    with beams, of each architecture the suite serves, batch like alone; so do sessions of equal lengths, which
    batch without a mask (alibi biases from the key positions alone)."""
    family, loaded = load_architecture(tmp_path / name, name)
    generator = torch.Generator().manual_seed(3)
    steps = three_sessions(family, loaded, generator)
    assert {family.batch_key(loaded, SPAN, inputs, state, None) for inputs, state in steps} == {(SPAN, 1)}
    assert_batch_matches_alone(family, loaded, steps)
    steps = [(step_inputs(loaded, generator, 1), prefilled(family, loaded, generator, 1, 4)) for _ in range(2)]
    assert_batch_matches_alone(family, loaded, steps)


def test_mixture_of_experts_sessions_batch_exactly(tmp_path):
    """Mixtral: each row of a batch is routed to its own experts, as it is alone."""
    make_tiny_mixtral(tmp_path / "mixtral", num_hidden_layers=SPAN.end)
    family, loaded = load(tmp_path / "mixtral", SPAN)
    steps = three_sessions(family, loaded, torch.Generator().manual_seed(6))
    assert {family.batch_key(loaded, SPAN, inputs, state, None) for inputs, state in steps} == {(SPAN, 1)}
    assert_batch_matches_alone(family, loaded, steps, steps_after=2)


SLIDING = sorted(name for name, (_, settings) in ARCHITECTURES.items() if "sliding_window" in settings)


@pytest.mark.parametrize("name", SLIDING)
def test_sliding_window_sessions_batch_within_and_past_their_windows(name, tmp_path):
    """With a window of 6: sessions of 2, 5, 6 and 13 positions (one left-padded, with beams) batch exactly, and so
    do steps of 3 tokens that cross a window's end. Batch after batch carries sessions past their windows, and
    crops of a batched step's last tokens (assisted decoding rejecting drafts) leave each session as they leave it
    after the same step alone."""
    window = 6
    family, loaded = load_architecture(tmp_path / name, name, sliding_window=window)
    generator = torch.Generator().manual_seed(4)
    padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    states = [prefilled(family, loaded, generator, 1, 2), prefilled(family, loaded, generator, 2, 5, mask=padded),
              prefilled(family, loaded, generator, 1, window), prefilled(family, loaded, generator, 1, 13)]  # fmt: skip
    beams = step_inputs(loaded, generator, 2, hypo_ids=torch.tensor([1, 0]))
    steps = [(beams if state.batch_size == 2 else step_inputs(loaded, generator, 1), state) for state in states]
    assert {family.batch_key(loaded, SPAN, inputs, state, None) for inputs, state in steps} == {(SPAN, 1)}
    assert_batch_matches_alone(family, loaded, steps, steps_after=3)
    steps = [(step_inputs(loaded, generator, 1, tokens=3), prefilled(family, loaded, generator, 1, n)) for n in (4, 9)]
    assert_batch_matches_alone(family, loaded, steps, steps_after=2)

    batched = [prefilled(family, loaded, generator, 1, length) for length in (1, 3, 8)]
    alone = [copy.deepcopy(state) for state in batched]
    with torch.inference_mode():
        for round in range(6):  # batch after batch, each finding the sessions' windows as the last one left them
            tokens = 1 + round % 3
            inputs = [step_inputs(loaded, generator, 1, tokens=tokens) for _ in batched]
            outputs = family.forward_batch(loaded, SPAN, list(zip(inputs, batched)))
            for output, step, state in zip(outputs, inputs, alone):
                expected = family.forward(loaded, SPAN, step, state, None)
                torch.testing.assert_close(output["hidden_states"], expected["hidden_states"], atol=ATOL, rtol=0)
            for state in (*batched, *alone):
                state.crop(state.length - (tokens - 1))
        for state, alone_state in zip(batched, alone):
            assert state.length == alone_state.length
            layers = state.cache.layers[SPAN.start : SPAN.end]
            for layer, alone_layer in zip(layers, alone_state.cache.layers[SPAN.start : SPAN.end]):
                assert layer.get_seq_length() == alone_layer.get_seq_length()
                torch.testing.assert_close(layer.keys, alone_layer.keys, atol=ATOL, rtol=0)


def make_moderate_t5(directory):
    """Tiny T5 as the other tests make it, with weights of the usual scale: theirs grow hidden states of 1000 and
    more, whose float32 rounding alone moves them past ATOL when a batch has other rows."""
    return make_tiny_t5(directory, initializer_factor=1.0)


ENCODER_DECODERS = {"t5": make_moderate_t5, "whisper": make_tiny_whisper, "speecht5": make_tiny_speecht5}


@pytest.fixture(scope="module", params=sorted(ENCODER_DECODERS))
def decoder_span(request, tmp_path_factory):
    """An encoder-decoder's decoder blocks from its second on (so that a span's cache positions start past 0)."""
    directory = ENCODER_DECODERS[request.param](tmp_path_factory.mktemp(request.param) / "model")
    config, weights = load_model_config(directory, FAMILIES)
    family = family_for(config)
    config = family.prepare_config(config)
    span = BlockSpan(family.encoder_blocks(config) + 1, family.num_blocks(config))
    return family, load_span(family, config, CheckpointIndex(weights), span, torch.float32, "cpu"), span


def opened(family, loaded, span, generator, batch: int, tokens: int, source: int, **masks):
    """A decoder session on `span` after its first step: `tokens` positions for `batch` rows, over an encoder
    output of `source` positions (with `attention_mask` and `encoder_attention_mask` if given)."""
    width = family.width(loaded.config)
    state = family.new_session_state(loaded, span, max_length=64)
    inputs = {"hidden_states": torch.randn(batch, tokens, width, generator=generator),
              "encoder_hidden_states": torch.randn(batch, source, width, generator=generator), **masks}  # fmt: skip
    with torch.inference_mode():
        family.forward(loaded, span, inputs, state, None)
    return state


def test_encoder_decoder_sessions_batch_exactly_once_their_first_steps_ran(decoder_span):
    """Decoder sessions of different lengths over encoder outputs of different lengths (one session left-padded,
    with a masked encoder output and beams) batch like alone; so do sessions of equal lengths, without masks. A
    first step, which brings the encoder output, runs alone; steps over encoder outputs whose cross-attention keys
    and values are too large to copy for every batch batch only over outputs of their own length."""
    family, loaded, span = decoder_span
    generator, width = torch.Generator().manual_seed(5), family.width(loaded.config)
    fresh = family.new_session_state(loaded, span, max_length=64)
    first = {"hidden_states": torch.randn(1, 2, width), "encoder_hidden_states": torch.randn(1, 5, width)}
    assert family.batch_key(loaded, span, first, fresh, None) is None
    longer = [opened(family, loaded, span, generator, 1, 2, source) for source in (600, 600, 601)]  # outweigh a block
    longer = [(step_inputs(loaded, generator, 1), state) for state in longer]
    assert [family.batch_key(loaded, span, inputs, state, None) for inputs, state in longer] == [(span, 1, 600), (span, 1, 600), (span, 1, 601)]
    assert_batch_matches_alone(family, loaded, longer[:2], span=span)
    masks = dict(attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), encoder_attention_mask=torch.tensor([[1] * 4 + [0] * 3, [1] * 7]))
    states = [opened(family, loaded, span, generator, 1, 6, 4), opened(family, loaded, span, generator, 2, 3, 7, **masks),
              opened(family, loaded, span, generator, 1, 1, 9)]  # fmt: skip
    steps = [(step_inputs(loaded, generator, 1), states[0]),
             (step_inputs(loaded, generator, 2, hypo_ids=torch.tensor([1, 1]), attention_mask=torch.tensor([[1], [1]])), states[1]),
             (step_inputs(loaded, generator, 1, output_layers=torch.tensor([span.start + 1])), states[2])]  # fmt: skip
    assert {family.batch_key(loaded, span, inputs, state, None) for inputs, state in steps} == {(span, 1)}
    assert_batch_matches_alone(family, loaded, steps, steps_after=2, span=span)
    steps = [(step_inputs(loaded, generator, 1, tokens=2), opened(family, loaded, span, generator, 1, 3, 5)) for _ in range(2)]
    assert_batch_matches_alone(family, loaded, steps, span=span)


def test_encoder_decoder_sessions_that_batched_share_their_cross_attention_caches(decoder_span):
    """A batch over encoder outputs of one length leaves its sessions' cross-attention keys and values as views of
    its own: the next batch of the same sessions takes them without a copy; one whose beams reorder a session, or
    of other sessions, copies them anew; one over outputs of different lengths (padded) leaves each session its
    own, and so does a step alone. Every batch computes what its steps compute alone."""
    family, loaded, span = decoder_span
    generator = torch.Generator().manual_seed(6)
    states = [opened(family, loaded, span, generator, batch, tokens, source) for batch, tokens, source in [(1, 3, 7), (2, 2, 7), (1, 5, 7), (1, 4, 9)]]
    layers = [family.stack_of(loaded.config, index)[1] for index in span]

    def memories(*members) -> list:
        """The memory of the cross-attention keys of sessions `members`, in every block."""
        return [states[index].cache.cross_attention_cache.layers[layer].keys.untyped_storage() for index in members for layer in layers]

    def run(members, hypo_ids=None):
        """A batch of sessions `members`, in that order, the second one's beams reordered by `hypo_ids`."""
        steps = [(step_inputs(loaded, generator, states[index].batch_size), states[index]) for index in members]
        if hypo_ids is not None:
            steps[1][0]["hypo_ids"] = hypo_ids
        assert_batch_matches_alone(family, loaded, steps, steps_after=0, span=span)  # a step alone would own its caches

    run([0, 1, 2])
    first = memories(0, 1, 2)  # held, so that no other tensor takes their addresses
    assert len({memory.data_ptr() for memory in first}) == len(layers)  # one per block, for all sessions
    run([0, 1, 2])
    assert [memory.data_ptr() for memory in memories(0, 1, 2)] == [memory.data_ptr() for memory in first]  # as they were
    run([0, 1, 2], hypo_ids=torch.tensor([1, 0]))
    second = memories(0, 1, 2)
    assert not {memory.data_ptr() for memory in second} & {memory.data_ptr() for memory in first}  # gathered anew
    run([1, 0, 2])
    assert not {memory.data_ptr() for memory in memories(0, 1, 2)} & {memory.data_ptr() for memory in second}  # stacked anew
    run([2, 0])
    run([2, 0])
    run([3, 0])
    assert len({memory.data_ptr() for memory in memories(3, 0)}) == 2 * len(layers)
    shared, inputs, copied = memories(2), step_inputs(loaded, generator, 1), copy.deepcopy(states[2])  # with 0's rows
    with torch.inference_mode():
        torch.testing.assert_close(family.forward(loaded, span, inputs, states[2], None)["hidden_states"],
                                   family.forward(loaded, span, inputs, copied, None)["hidden_states"], atol=0, rtol=0)  # fmt: skip
    own = [states[2].cache.cross_attention_cache.layers[layer].keys for layer in layers]
    assert all(memory.nbytes() > keys.nbytes == keys.untyped_storage().nbytes() for memory, keys in zip(shared, own))


@pytest.fixture(scope="module")
def batching_swarm(tiny_llama, tmp_path_factory):
    """Two servers that wait up to 100 ms for the steps of other active sessions (so that concurrent clients'
    steps batch even on a slow machine)."""
    with LocalSwarm(tiny_llama, ["0:2", "2:5"], server_args=("--batch-wait-ms", "100"), log_dir=tmp_path_factory.mktemp("logs")) as swarm:
        yield swarm


def bad_step_in_a_batch(address: str, hidden_size: int, steps: int, results: dict):
    """A client of its own on the first server: a prefill, then decode steps, one of which names beams its session
    does not hold; records the error it gets, and that the steps after it still run."""
    connection = Connection(address, timeout=60)
    try:
        session, _ = connection.request({"method": "open", "start": 0, "end": 2, "max_length": 64})
        connection.request({"method": "step", **session}, {"hidden_states": torch.randn(1, 4, hidden_size)})
        for index in range(steps):
            inputs = {"hidden_states": torch.randn(1, 1, hidden_size)}
            if index == steps // 2:
                inputs["hypo_ids"] = torch.tensor([3])
                with pytest.raises(BadRequestError, match="hypo_ids") as error:
                    connection.request({"method": "step", **session}, inputs)
                results["error"] = str(error.value)
            else:
                reply, _ = connection.request({"method": "step", **session}, inputs)
                results["length"] = reply["length"]
    finally:
        connection.close()


def assert_batching_swarm_matches_local(directory, spans: list[str], jobs: dict, local, logs, **local_kwargs):
    """Serves `directory` on servers of `spans` that wait up to 100 ms for each other's sessions, runs `jobs`
    (`generate_concurrently`) through them, and checks that each generation is the local model's and that every
    server batched. `local_kwargs` maps keywords of the local `generate` to callables that make their values anew
    for each job (a cache, say)."""
    with LocalSwarm(directory, spans, server_args=("--batch-wait-ms", "100"), log_dir=logs) as swarm:
        model = AutoDistributedModel.from_pretrained(directory, initial_peers=swarm.initial_peers, coverage_timeout=30)
        try:
            outputs = generate_concurrently(model, jobs)
            infos = [server_info(server.address) for server in swarm.servers]
        finally:
            model.remote.shutdown()
    for name, (input_ids, kwargs) in jobs.items():
        fresh = {key: make() for key, make in local_kwargs.items()}
        expected = local.generate(input_ids, output_logits=True, return_dict_in_generate=True, **fresh, **kwargs)
        assert_same_generation(outputs[name], expected)
    assert all(info["batches"] > 0 and info["steps_batched"] >= 2 * info["batches"] for info in infos), infos


def test_concurrent_clients_batch_and_each_gets_the_local_models_output(batching_swarm, tiny_llama, local_tiny_llama):
    """Sessions of different lengths and batch sizes (one left-padded, one with beams, one that ends early, one
    with a bad step) step together, and the clients' heads join; every generation matches the local model's."""
    model = AutoDistributedModel.from_pretrained(tiny_llama, initial_peers=batching_swarm.initial_peers, coverage_timeout=30)
    head = model.get_output_embeddings().forward
    assert isinstance(head, JoinedCalls)
    linear = head.forward

    def slow_head(rows):  # as slow as a real model's head, so that the clients' heads overlap and join
        time.sleep(0.02)
        return linear(rows)

    head.forward = slow_head
    before = [server_info(server.address) for server in batching_swarm.servers]
    padded = torch.tensor([[7, 8, 9, 10, 11, 12], [0, 0, 13, 14, 15, 16]])
    jobs = {
        "long prompt": (torch.tensor([list(range(20, 40))]), {"max_new_tokens": 14}),
        "short prompt": (torch.tensor([[5, 6]]), {"max_new_tokens": 14}),
        "ends early": (torch.tensor([[50, 51, 52, 53]]), {"max_new_tokens": 4}),
        "padded pair": (padded, {"max_new_tokens": 12, "attention_mask": (padded != 0).long()}),
        "beams": (torch.tensor([[60, 61, 62]]), {"max_new_tokens": 10, "num_beams": 3}),
    }
    bad = {}
    bad_client = threading.Thread(target=bad_step_in_a_batch, args=(batching_swarm.servers[0].address, 60, 12, bad))
    try:
        outputs = generate_concurrently(model, jobs, bad_client)
    finally:
        model.remote.shutdown()
    assert "beams of" in bad["error"] or "hypo_ids" in bad["error"]
    assert bad["length"] == 4 + 11
    for name, (input_ids, kwargs) in jobs.items():
        expected = local_tiny_llama.generate(input_ids, output_logits=True, return_dict_in_generate=True, **kwargs)
        assert_same_generation(outputs[name], expected)
    assert head.joined > 0
    after = [server_info(server.address) for server in batching_swarm.servers]
    for old, new in zip(before, after):
        assert new["batches"] > old["batches"] and new["steps_batched"] >= 2 * (new["batches"] - old["batches"])
        assert new["compute_seconds"] > old["compute_seconds"]


def test_concurrent_sessions_of_a_sliding_window_model_batch_within_and_past_their_windows(tmp_path_factory):
    """Gemma 3 (sliding and full layers alternating, window 8) behind two batching servers: sessions that start
    within the window and outgrow it, one that starts past it, and one whose prompt lookup drafts are rejected and
    cropped, step together; every generation matches the local model's."""
    directory = make_model(tmp_path_factory.mktemp("models") / "tiny-gemma3", "gemma3_text", sliding_window=8)
    local = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    jobs = {name: (torch.tensor([list(range(start, start + length))]), {"max_new_tokens": 10})
            for name, start, length in [("a", 10, 3), ("b", 20, 5), ("c", 30, 6), ("past", 40, 12)]}  # fmt: skip
    repeating = torch.tensor([[3, 4, 5, 6, 3, 4, 5, 6, 3, 4]])
    jobs["lookup"] = (repeating, {"max_new_tokens": 10, "prompt_lookup_num_tokens": 3})
    assert_batching_swarm_matches_local(directory, ["0:1", "1:4"], jobs, local, tmp_path_factory.mktemp("logs"))


def test_concurrent_sessions_of_an_encoder_decoder_batch(tmp_path_factory):
    """T5 behind two batching servers (the first holding the encoder and the decoder's first block): concurrent
    generations over inputs of different lengths (one batch with a padded row, one beam search) step together
    in the decoder; every generation matches the local model's."""
    directory = make_moderate_t5(tmp_path_factory.mktemp("models") / "tiny-t5")
    local = T5ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    padded = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    jobs = {
        "short": (torch.tensor([[20, 21, 22]]), {"max_new_tokens": 8}),
        "long": (torch.tensor([list(range(30, 45))]), {"max_new_tokens": 8}),
        "padded pair": (padded, {"max_new_tokens": 8, "attention_mask": (padded != 0).long()}),
        "beams": (torch.tensor([[50, 51, 52, 53]]), {"max_new_tokens": 6, "num_beams": 2}),
    }
    logs = tmp_path_factory.mktemp("logs")
    assert_batching_swarm_matches_local(directory, ["0:4", "4:7"], jobs, local, logs, cache=fresh_cache)


@contextlib.contextmanager
def autocast_inference():
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        yield


def call_while_a_product_runs(head, joined, release: threading.Event, calls: dict, queued: int | None = None) -> dict:
    """Calls `head` with `calls` (name -> (rows, mode)): the first alone, held in its product until the others
    (or `queued` of them) wait for it; returns each call's output or error."""
    outcomes = {}

    def call(name):
        rows, mode = calls[name]
        with mode():
            try:
                outcomes[name] = head(rows)
            except Exception as error:
                outcomes[name] = error

    threads = [threading.Thread(target=call, args=(name,)) for name in calls]
    threads[0].start()
    deadline = time.monotonic() + 30
    while not joined.running and time.monotonic() < deadline:
        time.sleep(0.01)
    for thread in threads[1:]:
        thread.start()
    while joined.queued < (len(calls) - 1 if queued is None else queued) and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join(timeout=30)
    release.clear()
    return outcomes


def test_concurrent_calls_of_a_joined_head_run_as_one_product_each_with_its_own_rows():
    """Calls that come while a product runs wait for it, then run as one (rows of any leading shape, in inference
    mode or not); a call whose rows the head does not take, or that fails the joined product, fails alone; a call
    with gradients or under autocast runs as it is."""
    torch.manual_seed(0)
    head = torch.nn.Linear(48, 97)
    linear, release = head.forward, threading.Event()

    def gated(rows):  # each product waits for the test; a row of infinities stands for bad input
        assert release.wait(30)
        if torch.isinf(rows).any():
            raise ValueError("infinite rows")
        return linear(rows)

    head.forward = gated
    joined = join_concurrent_calls(head)
    assert head.forward is joined and isinstance(head, torch.nn.Linear) and set(head.state_dict()) == {"weight", "bias"}
    calls = {
        "first": (torch.randn(1, 1, 48), torch.inference_mode),
        "block": (torch.randn(2, 3, 48), torch.inference_mode),
        "row": (torch.randn(48), torch.inference_mode),
        "no grad": (torch.randn(1, 5, 48), torch.no_grad),
        "no grad too": (torch.randn(2, 1, 48), torch.no_grad),
        "wrong width": (torch.randn(1, 1, 47), torch.inference_mode),
    }
    outcomes = call_while_a_product_runs(head, joined, release, calls)
    assert joined.joined == 2  # inference mode's two calls, and no_grad's two
    assert isinstance(outcomes["wrong width"], RuntimeError)
    for name, (rows, mode) in calls.items():
        if name != "wrong width":
            with mode():
                torch.testing.assert_close(outcomes[name], linear(rows), atol=1e-6, rtol=0)
            assert outcomes[name].is_inference() == (mode is torch.inference_mode)

    calls = {name: (rows, torch.inference_mode) for name, rows in
             [("first", torch.randn(1, 1, 48)), ("good", torch.randn(1, 1, 48)),
              ("infinite", torch.full((1, 1, 48), float("inf"))), ("good too", torch.randn(3, 48))]}  # fmt: skip
    outcomes = call_while_a_product_runs(head, joined, release, calls)
    assert joined.joined == 2  # the joined product failed: each of its calls ran alone
    assert isinstance(outcomes["infinite"], ValueError)
    with torch.inference_mode():
        for name in ["first", "good", "good too"]:
            torch.testing.assert_close(outcomes[name], linear(calls[name][0]), atol=1e-6, rtol=0)
    release.set()
    with torch.enable_grad():
        rows = torch.randn(1, 48, requires_grad=True)
        head(rows).sum().backward()  # with gradients, a call runs as it is, alone
    assert rows.grad is not None and joined.joined == 2
    release.clear()
    calls = {"first": (torch.randn(1, 48), torch.inference_mode), "plain": (torch.randn(1, 48), torch.inference_mode),
             "autocast": (torch.randn(1, 48), autocast_inference)}  # fmt: skip
    outcomes = call_while_a_product_runs(head, joined, release, calls, queued=1)  # autocast's call does not queue
    assert outcomes["plain"].dtype == torch.float32 and outcomes["autocast"].dtype == torch.bfloat16
    assert joined.joined == 2
