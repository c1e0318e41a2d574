"""Mixtral (mixture of experts) through real servers: exact against the local model, both checkpoint layouts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM

from swarm import AutoDistributedModel
from swarm.launch import LocalSwarm
from tests.conftest import ATOL, assert_same_generation, generate_both
from tests.test_push import push_counts


def make_tiny_mixtral(directory, **overrides):
    settings = dict(
        vocab_size=113,
        hidden_size=56,
        intermediate_size=44,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    model = MixtralForCausalLM(MixtralConfig(**{**settings, **overrides})).eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models") / "tiny-mixtral"
    make_tiny_mixtral(directory)
    return directory


@pytest.fixture(scope="module")
def fused_mixtral(tmp_path_factory):
    """The same kind of model saved in transformers' fused in-memory layout (`mlp.experts.gate_up_proj`)."""
    directory = tmp_path_factory.mktemp("models") / "fused-mixtral"
    model = make_tiny_mixtral(directory, sliding_window=6)
    (directory / "model.safetensors").unlink()
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, directory / "model.safetensors")
    assert "mlp.experts.gate_up_proj" in json.dumps(list(model.state_dict()))
    return directory


@pytest.mark.parametrize("checkpoint", ["tiny_mixtral", "fused_mixtral"])
def test_mixtral_over_two_servers_matches_local(checkpoint, request, tmp_path):
    directory = request.getfixturevalue(checkpoint)
    local = MixtralForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with LocalSwarm(directory, ["0:1", "1:3"], log_dir=tmp_path) as swarm:
        model = AutoDistributedModel.from_pretrained(directory, initial_peers=swarm.initial_peers)
        try:
            input_ids = torch.randint(0, 113, (1, 10), generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                torch.testing.assert_close(model(input_ids).logits, local(input_ids).logits, atol=ATOL, rtol=0)
            remote, expected = generate_both(model, local, input_ids, max_new_tokens=10)
            assert_same_generation(remote, expected)
            assert len(set(remote.sequences[0, 10:].tolist())) > 2
            assert push_counts(model.remote)[swarm.servers[0].address]["pushed"] == 10, "the servers did not push"

            batch = torch.randint(0, 113, (2, 7), generator=torch.Generator().manual_seed(4))
            mask = torch.ones_like(batch)
            mask[1, :2] = 0
            remote, expected = generate_both(model, local, batch, attention_mask=mask, max_new_tokens=8)
            assert_same_generation(remote, expected)

            settings = dict(do_sample=True, top_k=20, max_new_tokens=8)
            torch.manual_seed(5)
            sampled = model.generate(input_ids, **settings)
            torch.manual_seed(5)
            assert torch.equal(sampled, local.generate(input_ids, **settings))
            with model.inference_session(max_length=40):
                first = model.generate(input_ids, max_new_tokens=4)
                second = model.generate(input_ids[:, :3], max_new_tokens=4)
            reference = local.generate(torch.cat([first, input_ids[:, :3]], dim=1), max_new_tokens=4)
            assert torch.equal(second, reference[:, first.shape[1] :])
        finally:
            model.remote.shutdown()
