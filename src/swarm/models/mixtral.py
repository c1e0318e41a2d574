"""Mixtral (`MixtralForCausalLM`): a Llama-like decoder whose MLP is a mixture of experts.

A block is `model.layers.{i}` with its attention, router (`mlp.gate`) and all its experts. transformers
5.x keeps the experts fused (`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I)),
but `save_pretrained` writes the per-expert layout (`block_sparse_moe.experts.{e}.w1/w2/w3`,
`block_sparse_moe.gate`); servers read both. With `sliding_window` set, attention uses the sliding mask.
"""

from __future__ import annotations

import re

import torch
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRMSNorm, MixtralRotaryEmbedding

from swarm.models.decoder import DecoderOnlyFamily

PER_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(w[123])\.weight")


class MixtralFamily(DecoderOnlyFamily):
    model_types = ("mixtral",)
    architectures = ("MixtralForCausalLM",)
    layer_class = MixtralDecoderLayer
    rotary_class = MixtralRotaryEmbedding
    norm_class = MixtralRMSNorm

    def convert_block_tensors(self, config, tensors):
        """Renames `block_sparse_moe.` to `mlp.` and fuses per-expert w1/w3 and w2 into the fused layout."""
        tensors = {name.replace("block_sparse_moe.", "mlp."): tensor for name, tensor in tensors.items()}
        experts: dict[str, dict[int, torch.Tensor]] = {"w1": {}, "w2": {}, "w3": {}}
        for name in list(tensors):
            if match := PER_EXPERT.fullmatch(name):
                experts[match.group(2)][int(match.group(1))] = tensors.pop(name)
        if experts["w1"]:
            order = sorted(experts["w1"])
            tensors["mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([experts["w1"][e], experts["w3"][e]], dim=0) for e in order]
            )
            tensors["mlp.experts.down_proj"] = torch.stack([experts["w2"][e] for e in order])
        return tensors

    def make_causal_mask(self, loaded, hidden, mask, cache, positions, first_layer):
        if getattr(loaded.config, "sliding_window", None) is None:
            return super().make_causal_mask(loaded, hidden, mask, cache, positions, first_layer)
        return create_sliding_window_causal_mask(
            config=loaded.config,
            inputs_embeds=hidden,
            attention_mask=mask.to(hidden.device) if mask is not None else None,
            cache=cache,
            position_ids=positions,
            layer_idx=first_layer if cache is not None else None,
        )
