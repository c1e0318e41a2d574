"""A fast path for `LlamaDecoderLayer` (Llama, SmolLM2, TinyLlama, Llama 2/3, ...), which the generic decoder family
(`swarm.models.decoder`) uses for layers of exactly that class.

Servers run such a block through `llama_layer_forward`: the operations of `LlamaDecoderLayer.forward`, in
the same order on the same tensors, with transformers' own rotary and attention functions, but on the
layer's tensors read once (`LlamaLayerPlan`) instead of through `nn.Module.__call__`, module attribute
lookups and the layer's wrappers. That takes about a tenth off a decode step on CPU, and the outputs
are bitwise the same, which every server checks when it loads its blocks
(see `DecoderFamily.check_fast_path`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

Linear = tuple[torch.Tensor, torch.Tensor | None]  # weight, bias


@dataclass(frozen=True)
class LlamaLayerPlan:
    """What a `LlamaDecoderLayer` computes with, read from its modules once."""

    attention: LlamaAttention  # passed to the attention function, as the layer does
    attend: Callable  # the attention function the layer's config selects
    layer_idx: int
    head_dim: int
    scaling: float
    input_norm: tuple[torch.Tensor, float]  # weight, epsilon
    post_attention_norm: tuple[torch.Tensor, float]
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear
    act: Callable

    @classmethod
    def of(cls, layer: LlamaDecoderLayer) -> "LlamaLayerPlan":
        attention, mlp = layer.self_attn, layer.mlp
        implementation = attention.config._attn_implementation
        return cls(
            attention=attention,
            attend=ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward),
            layer_idx=attention.layer_idx,
            head_dim=attention.head_dim,
            scaling=attention.scaling,
            input_norm=(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
            post_attention_norm=(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
            **{
                name: (linear.weight, linear.bias)
                for name, linear in [
                    ("q", attention.q_proj),
                    ("k", attention.k_proj),
                    ("v", attention.v_proj),
                    ("o", attention.o_proj),
                    ("gate", mlp.gate_proj),
                    ("up", mlp.up_proj),
                    ("down", mlp.down_proj),
                ]
            },
            act=mlp.act_fn.forward,
        )


_plans: weakref.WeakKeyDictionary[LlamaDecoderLayer, LlamaLayerPlan] = weakref.WeakKeyDictionary()


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    """`LlamaRMSNorm.forward`."""
    dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + epsilon)
    return weight * hidden_states.to(dtype)


def llama_layer_forward(
    layer: LlamaDecoderLayer, hidden_states, attention_mask, position_embeddings, position_ids, cache
):
    """`layer(hidden_states=..., ...)` for a `LlamaDecoderLayer` in inference, with less Python per call."""
    plan = _plans.get(layer)
    if plan is None:
        plan = _plans[layer] = LlamaLayerPlan.of(layer)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, plan.head_dim)
    normed = rms_norm(hidden_states, *plan.input_norm)
    query = F.linear(normed, *plan.q).view(hidden_shape).transpose(1, 2)
    key = F.linear(normed, *plan.k).view(hidden_shape).transpose(1, 2)
    value = F.linear(normed, *plan.v).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, plan.layer_idx)
    output, _ = plan.attend(
        plan.attention, query, key, value, attention_mask, dropout=0.0, scaling=plan.scaling, position_ids=position_ids
    )
    hidden_states = hidden_states + F.linear(output.reshape(*input_shape, -1).contiguous(), *plan.o)
    normed = rms_norm(hidden_states, *plan.post_attention_norm)
    gate = plan.act(F.linear(normed, *plan.gate))
    return hidden_states + F.linear(gate * F.linear(normed, *plan.up), *plan.down)

