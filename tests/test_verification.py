"""Output verification (`ClientConfig(verify=...)`) against a server that computes wrong but well-formed outputs
(`tests.lying_server perturb`), on 127.0.0.1: the liar is detected by a second server, confirmed by a third,
left out, and the answer is the local model's.
"""

from __future__ import annotations

import pytest
import torch

from swarm import AutoDistributedModel
from swarm.client.config import ClientConfig
from swarm.client.session import catch_up
from swarm.client.verify import VerifyConfig
from swarm.errors import VerificationError
from swarm.launch import LocalSwarm
from tests.conftest import ATOL, assert_same_generation, generate_both
from tests.lying_server import start_liar


@pytest.fixture(scope="module")
def swarm_with_liar(tiny_llama, tmp_path_factory):
    """Two honest servers and a liar, each hosting all 5 blocks; yields (swarm, the liar's peer id)."""
    logs = tmp_path_factory.mktemp("logs")
    with LocalSwarm(tiny_llama, ["0:5", "0:5"], log_dir=logs) as swarm:
        liar, liar_id = start_liar("perturb", tiny_llama, swarm.initial_peers, logs / "liar.log")
        try:
            yield swarm, liar_id
        finally:
            liar.stop()


def client(swarm, tiny_llama, liar_id: str, verify: VerifyConfig | None):
    config = ClientConfig(initial_peers=swarm.initial_peers, pinned_peers={liar_id}, verify=verify)
    return AutoDistributedModel.from_pretrained(tiny_llama, client_config=config)


def prompt() -> torch.Tensor:
    return torch.randint(3, 131, (2, 9), generator=torch.Generator().manual_seed(5))


def test_without_verification_the_lie_goes_unnoticed(swarm_with_liar, tiny_llama, local_tiny_llama):
    """The control: the pinned liar's outputs are well-formed, so only a second opinion can catch them."""
    swarm, liar_id = swarm_with_liar
    model = client(swarm, tiny_llama, liar_id, verify=None)
    try:
        with torch.no_grad():
            assert not torch.allclose(model(prompt()).logits, local_tiny_llama(prompt()).logits, atol=ATOL)
    finally:
        model.remote.shutdown()


@pytest.mark.parametrize("verify", [VerifyConfig(fraction=1.0), VerifyConfig(fraction=0.2, first_steps=2, seed=0)], ids=["every-step", "first-steps"])
def test_a_lying_server_is_caught_and_generation_matches_local(swarm_with_liar, tiny_llama, local_tiny_llama, verify):
    swarm, liar_id = swarm_with_liar
    model = client(swarm, tiny_llama, liar_id, verify)
    try:
        remote, expected = generate_both(model, local_tiny_llama, prompt(), max_new_tokens=8)
        assert_same_generation(remote, expected)
        assert liar_id in model.remote.banned_until
    finally:
        model.remote.shutdown()


def test_a_lying_server_is_caught_in_a_forward_pass(swarm_with_liar, tiny_llama, local_tiny_llama):
    swarm, liar_id = swarm_with_liar
    model = client(swarm, tiny_llama, liar_id, VerifyConfig(fraction=1.0))
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(prompt()).logits, local_tiny_llama(prompt()).logits, atol=ATOL, rtol=0)
        assert liar_id in model.remote.banned_until
    finally:
        model.remote.shutdown()


def test_two_servers_that_disagree_with_no_third_raise(tiny_llama, tmp_path):
    with LocalSwarm(tiny_llama, ["0:5"], log_dir=tmp_path) as swarm:
        liar, liar_id = start_liar("perturb", tiny_llama, swarm.initial_peers, tmp_path / "liar.log")
        try:
            model = client(swarm, tiny_llama, liar_id, VerifyConfig(fraction=1.0))
            try:
                with pytest.raises(VerificationError, match="no third server"):
                    model.generate(prompt(), max_new_tokens=2)
            finally:
                model.remote.shutdown()
        finally:
            liar.stop()


def test_a_lying_server_is_caught_during_beam_search(swarm_with_liar, tiny_llama, local_tiny_llama):
    """Beam search reorders the servers' caches between steps: the checking server's catch-up keeps the order."""
    swarm, liar_id = swarm_with_liar
    model = client(swarm, tiny_llama, liar_id, VerifyConfig(fraction=0.3, first_steps=1, seed=1))
    try:
        remote, expected = generate_both(model, local_tiny_llama, prompt(), max_new_tokens=6, num_beams=3)
        assert_same_generation(remote, expected)
        assert liar_id in model.remote.banned_until
    finally:
        model.remote.shutdown()


def test_catch_up_joins_steps_into_as_few_requests_as_give_the_same_state():
    hidden = lambda tokens: torch.zeros(2, tokens, 4)  # noqa: E731
    positions = lambda start, tokens: torch.arange(start, start + tokens).expand(2, -1)  # noqa: E731
    first = {"hidden_states": hidden(3), "position_ids": positions(0, 3), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}
    steps = [first, {"hidden_states": hidden(1), "position_ids": positions(3, 1)},
             {"hidden_states": hidden(1), "position_ids": positions(4, 1), "hypo_ids": torch.tensor([1, 0])},
             {"hidden_states": hidden(1), "position_ids": positions(5, 1)}]  # fmt: skip
    joined = catch_up(steps)
    assert len(joined) == 2  # the reorder starts a new request
    assert joined[0]["hidden_states"].shape == (2, 4, 4) and joined[0]["position_ids"].tolist() == [[0, 1, 2, 3]] * 2
    assert joined[0]["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert joined[1]["hypo_ids"].tolist() == [1, 0] and joined[1]["position_ids"].tolist() == [[4, 5]] * 2
