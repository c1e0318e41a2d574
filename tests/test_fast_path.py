"""Servers run Llama blocks through `llama_layer_forward`: it must give bitwise what the layers give, or not be used."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from swarm.checkpoint import CheckpointIndex, load_model_config
from swarm.models import CAUSAL_LM, FAMILIES, family_for
from swarm.models.base import load_span
from swarm.models.decoder import DecoderFamily
from swarm.models.llama import llama_layer_forward
from swarm.spans import BlockSpan
from tests.conftest import make_tiny_llama

CONFIGS = {
    "default": {},
    "biases": {"attention_bias": True, "mlp_bias": True},
    "head_dim": {"head_dim": 16},
    "one_kv_head": {"num_key_value_heads": 1},
    "no_grouping": {"num_key_value_heads": 6},
    "gelu_llama3_rope": {
        "hidden_act": "gelu",
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
}


def load(directory, blocks: BlockSpan, dtype=torch.float32, family=None, attention="sdpa", quant_type="none"):
    config, weights = load_model_config(directory, FAMILIES)
    family = family or family_for(config)
    config = family.prepare_config(config)
    config._attn_implementation = attention
    return family, load_span(family, config, CheckpointIndex(weights), blocks, dtype, "cpu", quant_type=quant_type)


def run_session(family, loaded, span: BlockSpan, fast: bool, dtype=torch.float32) -> list[torch.Tensor]:
    """A left-padded prefill, steps, a beam reorder and a forward without a session, through `span`."""
    loaded.fast_path = fast
    generator = torch.Generator().manual_seed(1)
    width = loaded.config.hidden_size

    def hidden(batch, tokens):
        return torch.randn(batch, tokens, width, generator=generator).to(dtype)

    state = family.new_session_state(loaded, span, max_length=40)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    outputs = []
    with torch.inference_mode():
        outputs.append(family.forward(loaded, span, {"hidden_states": hidden(2, 7), "attention_mask": mask}, state, None))
        for step in range(4):
            inputs = {"hidden_states": hidden(2, 1)}
            if step == 2:
                inputs["hypo_ids"] = torch.tensor([1, 1])
            outputs.append(family.forward(loaded, span, inputs, state, None))
        outputs.append(family.forward(loaded, span, {"hidden_states": hidden(3, 9)}, None, None))
    return [output["hidden_states"] for output in outputs]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", CONFIGS)
def test_fast_path_is_bitwise_the_layers(tmp_path, name, attention):
    directory = make_tiny_llama(tmp_path / name, **CONFIGS[name])
    span = BlockSpan(1, 4)
    family, loaded = load(directory, span, attention=attention)
    assert loaded.fast_path
    slow, fast = run_session(family, loaded, span, False), run_session(family, loaded, span, True)
    for slow_output, fast_output in zip(slow, fast):
        assert torch.equal(slow_output, fast_output)


def test_fast_path_in_bfloat16(tmp_path):
    directory = make_tiny_llama(tmp_path / "model")
    span = BlockSpan(0, 5)
    family, loaded = load(directory, span, torch.bfloat16)
    assert loaded.fast_path
    slow = run_session(family, loaded, span, False, torch.bfloat16)
    fast = run_session(family, loaded, span, True, torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(slow, fast))


def off_by_one_ulp(layer, hidden_states, *args):
    output = llama_layer_forward(layer, hidden_states, *args)
    return torch.nextafter(output, torch.full_like(output, float("inf")))


def broken(layer, hidden_states, *args):
    raise AttributeError("no such submodule")


@pytest.mark.parametrize("fast_path", [off_by_one_ulp, broken], ids=["differs", "raises"])
def test_a_fast_path_that_differs_is_not_used(tiny_llama, fast_path, caplog):
    family = DecoderFamily(fast_paths={LlamaDecoderLayer: fast_path})
    span = BlockSpan(0, 2)
    _, loaded = load(tiny_llama, span, family=family)
    assert not loaded.fast_path
    assert "Not using the fast path" in caplog.text
    _, reference = load(tiny_llama, span)
    expected = run_session(CAUSAL_LM, reference, span, False)
    assert all(torch.equal(a, b) for a, b in zip(expected, run_session(family, loaded, span, False)))
