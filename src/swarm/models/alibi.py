"""Alibi position biases for the decoders whose model forward, not their layers, computes them (Bloom, Falcon).

Each function mirrors the lines of the model's forward that build the biases from the 2-D attention mask of
every position so far (None while it is all ones), with transformers' own `build_alibi_tensor`, so a server
gives its layers what the whole model would. Signature, as `DecoderFamily(position_bias=...)` calls it:

    position_bias(config, hidden, mask, cache, positions, past, layer_idx, masks) -> (masks, alibi)

`masks` holds each attention type's mask as the family made it; the function returns them (changed or not)
and the `alibi` tensor the layers take.
"""

from __future__ import annotations

import math

import torch
from transformers.masking_utils import create_causal_mask
from transformers.models.bloom import modeling_bloom
from transformers.models.falcon import modeling_falcon


def bloom_alibi(config, hidden, mask, cache, positions, past: int, layer_idx: int, masks: dict):
    """`BloomModel.forward`: biases from the mask, or from the key length alone while there is no padding."""
    batch, tokens = hidden.shape[:2]
    if mask is None:
        slopes = modeling_bloom._get_alibi_slopes(config.n_head, hidden.device)
        alibi = slopes[:, None, None] * torch.arange(past + tokens, device=hidden.device)
        return masks, alibi.repeat(batch, 1, 1).to(hidden.dtype)
    return masks, modeling_bloom.build_alibi_tensor(mask, config.n_head, dtype=hidden.dtype)


def falcon_alibi(config, hidden, mask, cache, positions, past: int, layer_idx: int, masks: dict):
    """`FalconModel.forward` with `config.alibi`: biases folded into a materialized causal mask. Without alibi
    (rotary Falcon) nothing changes."""
    if not config.alibi:
        return masks, None
    batch, tokens = hidden.shape[:2]
    full_mask = mask if mask is not None else torch.ones(batch, past + tokens, dtype=torch.long, device=hidden.device)
    alibi = modeling_falcon.build_alibi_tensor(full_mask, config.num_attention_heads, dtype=hidden.dtype)
    causal_mask = create_causal_mask(
        config=config,
        inputs_embeds=hidden,
        attention_mask=mask,
        cache=cache,
        position_ids=positions,
        layer_idx=layer_idx if cache is not None else None,
        allow_is_causal_skip=False,
    )
    if causal_mask is not None and causal_mask.ndim == 4:
        min_dtype = torch.finfo(hidden.dtype).min
        if causal_mask.dtype == torch.bool:
            zero = torch.full((), 0.0, device=causal_mask.device, dtype=hidden.dtype)
            causal_mask = torch.where(causal_mask, zero, min_dtype)
        alibi = alibi.reshape(batch, -1, *alibi.shape[1:])
        scaled = alibi / math.sqrt(config.hidden_size // config.num_attention_heads)
        causal_mask = torch.masked_fill(scaled, causal_mask < -1, min_dtype)
    return dict.fromkeys(masks, causal_mask), alibi
