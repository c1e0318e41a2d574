"""Llama and every checkpoint with `model_type: llama` (SmolLM2, TinyLlama, Llama 2/3, ...).

Blocks are `model.layers.{i}`; the client keeps `model.embed_tokens`, `model.norm` and `lm_head`
(tied to the embeddings when `tie_word_embeddings` is set, as in SmolLM2).

Servers run a block through `llama_layer_forward`: the operations of `LlamaDecoderLayer.forward`, in
the same order on the same tensors, with each submodule's `forward` called directly. Skipping the
per-call machinery of `nn.Module.__call__` and the layer's wrappers takes about a tenth off a decode
step on CPU, and the outputs are bitwise the same, which every server checks when it loads its blocks
(see `DecoderOnlyFamily.check_fast_path`).
"""

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from swarm.models.decoder import DecoderOnlyFamily


def llama_layer_forward(
    layer: LlamaDecoderLayer, hidden_states, attention_mask, position_embeddings, position_ids, cache
):
    """`layer(hidden_states=..., ...)` for a `LlamaDecoderLayer` in inference, with less Python per call."""
    attention, mlp = layer.self_attn, layer.mlp
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, attention.head_dim)
    normed = layer.input_layernorm.forward(hidden_states)
    query = attention.q_proj.forward(normed).view(hidden_shape).transpose(1, 2)
    key = attention.k_proj.forward(normed).view(hidden_shape).transpose(1, 2)
    value = attention.v_proj.forward(normed).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, attention.layer_idx)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    output, _ = attend(
        attention, query, key, value, attention_mask, dropout=0.0, scaling=attention.scaling, position_ids=position_ids
    )
    output = attention.o_proj.forward(output.reshape(*input_shape, -1).contiguous())
    hidden_states = hidden_states + output
    normed = layer.post_attention_layernorm.forward(hidden_states)
    gate = mlp.act_fn.forward(mlp.gate_proj.forward(normed))
    return hidden_states + mlp.down_proj.forward(gate * mlp.up_proj.forward(normed))


class LlamaFamily(DecoderOnlyFamily):
    model_types = ("llama",)
    architectures = ("LlamaForCausalLM",)
    layer_class = LlamaDecoderLayer
    rotary_class = LlamaRotaryEmbedding
    norm_class = LlamaRMSNorm
    fast_layer_forward = staticmethod(llama_layer_forward)
