"""Quantized serving (issue 18): servers that hold their blocks' linear layers in int8 or nf4 (bitsandbytes, on the
CPU) announce it, a mixed swarm (an int8 server, a float32 one) generates what a local model quantized the same way
generates, and a client that requires a precision routes around the servers that do not meet it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, LlamaForCausalLM
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.pytorch_utils import Conv1D

from swarm import AutoDistributedModel
from swarm.client.config import ClientConfig
from swarm.errors import MissingBlocksError
from swarm.launch import LocalSwarm
from swarm.quantization import quantize_linears
from tests.conftest import assert_same_generation, generate_both, generate_concurrently, make_tiny_llama, server_info

PROMPT = torch.tensor([[1, 17, 42, 99, 5, 61, 23, 7]])


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    """int8 0:3, float32 3:5 (both waiting up to 100 ms to batch steps), nf4 0:5 and float32 0:3, in that order."""
    with LocalSwarm(tiny_llama, [], log_dir=tmp_path_factory.mktemp("logs")) as swarm:
        launched = [
            swarm.launch_server("0:3", "--quant-type", "int8", "--batch-wait-ms", "100"),
            swarm.launch_server("3:5", "--batch-wait-ms", "100"),
            swarm.launch_server("0:5", "--quant-type", "nf4"),
            swarm.launch_server("0:3", "--torch-dtype", "float32"),
        ]
        for server in launched:
            server.wait_ready(swarm.ready_timeout)
        yield swarm


def peer_id(server) -> str:
    return server.wait_for(r"ready: .* peer (\S+)", timeout=1).group(1)


def local_model(path, quantized: dict[range, str]) -> LlamaForCausalLM:
    """The local model with the layers of each range quantized as a server of them quantizes its blocks."""
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for layers, quant_type in quantized.items():
        for index in layers:
            quantize_linears(model.model.layers[index], quant_type, torch.float32, "cpu")
    return model


def connect(path, swarm, **config) -> AutoDistributedModel:
    return AutoDistributedModel.from_pretrained(path, client_config=ClientConfig(initial_peers=swarm.initial_peers, **config))


def route_of(model, input_ids) -> list[tuple[str, str]]:
    """(span, quant_type) of each hop of the route a session takes."""
    with model.inference_session(max_length=input_ids.shape[1] + 1) as session:
        model(input_ids)
        return [(str(hop.span), hop.server.quant_type) for hop in session.route]


def test_servers_announce_and_report_how_they_hold_their_weights(tiny_llama, swarm):
    model = connect(tiny_llama, swarm)
    try:
        records = {record.peer_id: record for block in model.remote.fetch_records() for record in block}
        announced = [(records[peer_id(server)].quant_type, records[peer_id(server)].dtype) for server in swarm.servers]
        assert announced == [("int8", "float32"), ("none", "float32"), ("nf4", "float32"), ("none", "float32")]
        info, _ = model.remote.connection(records[peer_id(swarm.servers[0])]).request({"method": "info"})
        assert (info["quant_type"], info["dtype"]) == ("int8", "float32")
        assert "float32 weights in int8" in swarm.servers[0].wait_for(r"ready: .*", timeout=1).group(0)
    finally:
        model.remote.shutdown()


def test_a_mixed_swarm_matches_a_local_model_quantized_the_same_way(tiny_llama, swarm):
    """int8 on 0:3 (pinned), float32 on 3:5: logits within 1e-4 of the local model with layers 0-2 in int8."""
    model = connect(tiny_llama, swarm, pinned_peers={peer_id(swarm.servers[0])}, min_precision="int8")
    try:
        assert route_of(model, PROMPT) == [("0:3", "int8"), ("3:5", "none")]
        local = local_model(tiny_llama, {range(0, 3): "int8"})
        assert_same_generation(*generate_both(model, local, PROMPT))
        unquantized = local_model(tiny_llama, {})
        difference = (model(PROMPT).logits - unquantized(PROMPT).logits).abs().max()
        assert difference > 1e-4, "int8 weights that give float32's logits were not quantized"
    finally:
        model.remote.shutdown()


def test_an_int8_server_runs_concurrent_sessions_steps_alone(tiny_llama, swarm):
    """LLM.int8 computes a batch's rows together (an outlier in one row changes how the others are multiplied),
    so the int8 server runs each session's steps alone, and each concurrent generation is the local int8 model's;
    the float32 server after it batches the same sessions' steps."""
    model = connect(tiny_llama, swarm, pinned_peers={peer_id(swarm.servers[0])}, min_precision="int8")
    before = [server_info(server.address) for server in swarm.servers[:2]]
    jobs = {f"prompt {length}": (PROMPT[:, :length], {"max_new_tokens": 12, "do_sample": False}) for length in (3, 5, 8)}
    try:
        assert route_of(model, PROMPT) == [("0:3", "int8"), ("3:5", "none")]
        outputs = generate_concurrently(model, jobs)
    finally:
        model.remote.shutdown()
    local = local_model(tiny_llama, {range(0, 3): "int8"})
    for name, (input_ids, kwargs) in jobs.items():
        assert_same_generation(outputs[name], local.generate(input_ids, output_logits=True, return_dict_in_generate=True, **kwargs))
    int8, float32 = (server_info(server.address)["batches"] - info["batches"] for server, info in zip(swarm.servers, before))
    assert int8 == 0 and float32 > 0, (int8, float32)


def test_an_nf4_server_matches_a_local_model_in_nf4(tiny_llama, swarm):
    model = connect(tiny_llama, swarm, pinned_peers={peer_id(swarm.servers[2])})
    try:
        assert route_of(model, PROMPT) == [("0:5", "nf4")]
        local = local_model(tiny_llama, {range(0, 5): "nf4"})
        assert_same_generation(*generate_both(model, local, PROMPT))
    finally:
        model.remote.shutdown()


def test_a_required_precision_routes_around_servers_below_it(tiny_llama, swarm):
    """The int8 and nf4 servers are pinned, yet a client that requires float32 goes through the float32 ones and
    generates what the unquantized local model generates; one that requires more than any server of some blocks
    holds is told which blocks are missing."""
    pinned = {peer_id(swarm.servers[0]), peer_id(swarm.servers[2])}
    model = connect(tiny_llama, swarm, pinned_peers=pinned, min_precision="float32")
    try:
        assert route_of(model, PROMPT) == [("0:3", "none"), ("3:5", "none")]
        assert_same_generation(*generate_both(model, local_model(tiny_llama, {}), PROMPT))
    finally:
        model.remote.shutdown()
    without_float32 = {peer_id(swarm.servers[3])}
    model = connect(tiny_llama, swarm, min_precision="int8", excluded_peers=without_float32)
    try:
        assert route_of(model, PROMPT) == [("0:3", "int8"), ("3:5", "none")]
    finally:
        model.remote.shutdown()
    message = r"blocks \[0, 3\) of model 'tiny-llama' in bfloat16 or more precise weights \(min_precision\)"
    with pytest.raises(MissingBlocksError, match=message):
        connect(tiny_llama, swarm, min_precision="bfloat16", excluded_peers=without_float32, coverage_timeout=2)


def test_bad_precisions_are_refused_by_name():
    with pytest.raises(ValueError, match="min_precision must be one of float32, float16, bfloat16, int8, nf4"):
        ClientConfig(min_precision="int4")


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_gpt2s_conv1d_layers_are_quantized_as_the_linear_layers_they_are(quant_type):
    # 48 features: the MLP's c_proj takes whole blocks of 64 inputs but gives 48 outputs, not whole blocks of 32
    config = GPT2Config(n_embd=48, n_layer=1, n_head=4, vocab_size=50, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    block = GPT2Block(config).eval()
    hidden = torch.randn(2, 5, 48)
    with torch.inference_mode():
        expected = block(hidden)[0]
        assert quantize_linears(block, quant_type, torch.float32, "cpu") == 4  # attention's c_attn, c_proj; the MLP's
        assert not any(isinstance(module, Conv1D) for module in block.modules())
        quantized = block(hidden)[0]
    error = (quantized - expected).abs().max().item()  # the block changes its input by about 4: a wrong weight shows
    assert 0 < error < (0.01 if quant_type == "int8" else 0.1), error


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_blocks_are_quantized_as_transformers_quantizes_a_whole_model(quant_type, tmp_path):
    """A local model that transformers quantizes (`BitsAndBytesConfig` with its defaults: LLM.int8's outlier
    threshold of 6, nf4 without double quantization) computes what one with its layers quantized as a server's are
    does, to the bit. Its weights are large enough that some activations pass the outlier threshold."""
    directory = make_tiny_llama(tmp_path / "llama", hidden_size=64, intermediate_size=128, num_attention_heads=4, initializer_range=0.2)
    if quant_type == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    reference = LlamaForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu", dtype=torch.float32)
    model = local_model(directory, {range(5): quant_type})
    largest = []  # the largest input of each quantized layer
    for module in model.modules():
        if "bitsandbytes" in type(module).__module__:
            module.register_forward_pre_hook(lambda module, inputs: largest.append(inputs[0].abs().max().item()))
    with torch.inference_mode():
        expected = reference(PROMPT).logits
        assert torch.equal(model(PROMPT).logits, expected)
        assert (expected - local_model(directory, {})(PROMPT).logits).abs().max() > 1e-3
    assert max(largest) > 6, largest


def loaded_by_transformers(model_class, directory, dtype: torch.dtype, quant_type: str):
    """The model at `directory` as transformers loads it in `dtype`, quantized by `BitsAndBytesConfig`'s defaults."""
    quantization = {
        "none": None,
        "int8": BitsAndBytesConfig(load_in_8bit=True),
        "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype),
    }[quant_type]
    return model_class.from_pretrained(directory, dtype=dtype, quantization_config=quantization, device_map="cpu").eval()


# shapes bitsandbytes' nf4 CPU kernel takes (whole blocks of 64 inputs and 32 outputs), which transformers' nf4
# models need: they run it on every layer
NF4_SHAPES = {"falcon": dict(hidden_size=64), "gpt2": dict(n_embd=64), "bloom": dict(hidden_size=64),
              "gemma3_text": dict(hidden_size=64, intermediate_size=128, head_dim=16, query_pre_attn_scalar=16)}  # fmt: skip


@pytest.mark.parametrize("name", sorted(NF4_SHAPES))
@pytest.mark.parametrize(("dtype", "quant_type"), [("float32", "int8"), ("bfloat16", "nf4"), ("float16", "none")])
def test_decoder_blocks_hold_their_layers_as_transformers_loads_the_model(name, dtype, quant_type, tmp_path):
    """Every block of a causal LM, loaded in half precision or quantized, computes what the same layers of the
    model transformers loads so compute, to the bit: Falcon's own linear class (`FalconLinear`) stays unquantized,
    as transformers leaves it; GPT-2's `Conv1D` is quantized."""
    from swarm.checkpoint import CheckpointIndex, load_model_config
    from swarm.models import FAMILIES, family_for
    from swarm.models.base import load_span
    from swarm.spans import BlockSpan
    from tests.test_architectures import make_model, random_ids

    directory = make_model(tmp_path / name, name, **NF4_SHAPES[name])
    dtype = getattr(torch, dtype)
    local = loaded_by_transformers(AutoModelForCausalLM, directory, dtype, quant_type)
    config, weights = load_model_config(directory, FAMILIES)
    family = family_for(config)
    config = family.prepare_config(config)
    span = BlockSpan(0, family.num_blocks(config))
    loaded = load_span(family, config, CheckpointIndex(weights), span, dtype, "cpu", quant_type=quant_type)
    layers = local.get_submodule(family.layout(config).layers)
    assert [type(module).__name__ for module in loaded.blocks[0].modules()] == [type(module).__name__ for module in layers[0].modules()]
    outputs = []
    layers[-1].register_forward_hook(lambda module, inputs, output: outputs.append(output[0] if isinstance(output, tuple) else output))
    input_ids = random_ids(1, 9, seed=3)
    with torch.inference_mode():
        embedded = local(input_ids, output_hidden_states=True).hidden_states[0]
        served = family.forward(loaded, span, {"hidden_states": embedded}, None, None)["hidden_states"]
    torch.testing.assert_close(served, outputs[0], atol=0, rtol=0)


def test_precision_rules_keep_in_float32_what_transformers_keeps():
    """For a model class that keeps some tensors in float32 (`_keep_in_fp32_modules_strict`: DeepSeek-V3's router
    in float16 and bfloat16), `PrecisionRules` picks the tensors transformers' own loading plan picks."""
    from accelerate import init_empty_weights
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.core_model_loading import build_glob_alternation

    from swarm.quantization import PrecisionRules

    config = DeepseekV3Config(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, vocab_size=100)  # fmt: skip
    with init_empty_weights():
        model = DeepseekV3ForCausalLM(config)
    rules = PrecisionRules.of(model)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        plan = model._get_dtype_plan(dtype)
        pattern = build_glob_alternation(list(plan))[0] if plan else None
        expected = {name for name in model.state_dict() if pattern is not None and pattern.search(name)}
        assert {name for name in model.state_dict() if rules.keeps_in_float32(name, dtype)} == expected
        assert bool(expected) == (dtype != torch.float32)
