"""Mixtral's checkpoints: the generic decoder family serves `MixtralForCausalLM` with this converter.

transformers 5.x keeps a block's experts fused (`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj`
(E, H, I)), but `save_pretrained` writes the per-expert layout (`block_sparse_moe.experts.{e}.w1/w2/w3`,
`block_sparse_moe.gate`); servers read both.
"""

from __future__ import annotations

import re

import torch

PER_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(w[123])\.weight")


def fuse_mixtral_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
