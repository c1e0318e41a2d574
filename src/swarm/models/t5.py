"""T5 (`T5ForConditionalGeneration`): an encoder-decoder, cut into blocks numbered in execution order.

Blocks 0..E-1 are `encoder.block.{i}`, blocks E..E+D-1 are `decoder.block.{j}` (see `swarm.models.encoder_decoder`
for the stacks, the requests and the sessions). Each block keeps its index within its stack, as in the whole model.

Only block 0 of each stack owns `relative_attention_bias`. Each server loads that small embedding
(buckets x heads) for every stack it serves and computes the position bias itself, so a span may start
anywhere.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import T5ForConditionalGeneration
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.models.t5.modeling_t5 import T5Attention, T5Block

from swarm.models.base import ClientStack, LoadedSpan
from swarm.models.encoder_decoder import DECODER, ENCODER, KEPT, DecoderStep, EncoderDecoderFamily, Keep
from swarm.quantization import PrecisionRules
from swarm.spans import BlockSpan

RELATIVE_BIAS = "{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"  # every server of a stack needs it


class T5Family(EncoderDecoderFamily):
    def num_blocks(self, config) -> int:
        return config.num_layers + config.num_decoder_layers

    def encoder_blocks(self, config) -> int:
        return config.num_layers

    def width(self, config) -> int:
        return config.d_model

    def prepare_config(self, config):
        config._attn_implementation = "sdpa"
        return config

    def stack_config(self, config, stack: str):
        stack_config = copy.deepcopy(config)
        stack_config.is_decoder = stack == DECODER
        stack_config.use_cache = stack == DECODER
        if stack == DECODER:
            stack_config.num_layers = config.num_decoder_layers
        return stack_config

    def block_tensor_names(self, config, index: int, checkpoint_names) -> dict[str, str]:
        stack, position = self.stack_of(config, index)
        prefix = f"{stack}.block.{position}."
        return {name: name[len(prefix) :] for name in checkpoint_names if name.startswith(prefix)}

    def precision_rules(self, config) -> PrecisionRules:
        from accelerate import init_empty_weights

        with init_empty_weights():
            return PrecisionRules.of(T5ForConditionalGeneration(config))

    def residual_dtype(self, config, dtype: torch.dtype) -> torch.dtype:
        wo = f"{self.block_path(config, 0)}.layer.1.DenseReluDense.wo.weight"
        return torch.float32 if self.precision_rules(config).keeps_in_float32(wo, dtype) else dtype

    def block_path(self, config, index: int) -> str:
        stack, position = self.stack_of(config, index)
        return f"{stack}.block.{position}"

    def build_blocks(self, config, span: BlockSpan) -> list[nn.Module]:
        blocks = []
        for index in span:
            stack, position = self.stack_of(config, index)
            stack_config = self.stack_config(config, stack)
            blocks.append(T5Block(stack_config, has_relative_attention_bias=position == 0, layer_idx=position))
        return blocks

    def shared_tensor_names(self, config, checkpoint_names) -> list[str]:
        return [RELATIVE_BIAS.format(stack=stack) for stack in (ENCODER, DECODER)]

    def build_helpers(self, config, device, checkpoint, span: BlockSpan):
        """For each stack the span touches, an attention module holding only its relative position bias."""
        from accelerate import init_empty_weights

        helpers = {}
        for stack in {self.stack_of(config, index)[0] for index in span}:
            with init_empty_weights():
                attention = T5Attention(self.stack_config(config, stack), has_relative_attention_bias=True, layer_idx=0)
            name = RELATIVE_BIAS.format(stack=stack)
            weight = checkpoint.load([name])[name]
            attention.relative_attention_bias.weight = torch.nn.Parameter(weight.to(device), requires_grad=False)
            helpers[stack] = attention
        return helpers

    def run_encoder(self, loaded: LoadedSpan, sub_span: BlockSpan, hidden, mask, keep: Keep):
        config = self.stack_config(loaded.config, ENCODER)
        mask = create_bidirectional_mask(config=config, inputs_embeds=_as_embeddings(loaded, hidden), attention_mask=mask)
        position_bias = loaded.helpers[ENCODER].compute_bias(hidden.shape[1], hidden.shape[1], device=hidden.device)
        for index, block in zip(sub_span, loaded.blocks_of(sub_span)):
            hidden, position_bias, _ = block(hidden, mask, position_bias)
            keep(index, hidden)
        return hidden

    def run_decoder(self, loaded: LoadedSpan, sub_span: BlockSpan, hidden, step: DecoderStep, keep: Keep):
        config = self.stack_config(loaded.config, DECODER)
        tokens, past, cache = hidden.shape[1], step.past, step.cache
        encoder_hidden = step.kept["encoder_hidden_states"]
        self_cache = cache.self_attention_cache if cache is not None else None
        first_layer, embeddings = self.stack_of(loaded.config, sub_span.start)[1], _as_embeddings(loaded, hidden)
        causal_mask = create_causal_mask(
            config=config, inputs_embeds=embeddings, attention_mask=step.mask, cache=self_cache, layer_idx=first_layer
        )
        cross_mask = create_bidirectional_mask(
            config=config,
            inputs_embeds=embeddings,
            attention_mask=step.kept.get("encoder_attention_mask"),
            encoder_hidden_states=encoder_hidden,
        )
        position_bias = loaded.helpers[DECODER].compute_bias(tokens, past + tokens, hidden.device, past_seen_tokens=past)
        cross_bias = None
        for index, block in zip(sub_span, loaded.blocks_of(sub_span)):
            hidden, position_bias, cross_bias = block(
                hidden, causal_mask, position_bias, encoder_hidden, cross_mask, cross_bias, cache=cache
            )
            keep(index, hidden)
        return hidden

    # The client side: the shared embedding, the final norms and the head run on the client, as T5's own code.

    def client_skeleton(self, config) -> nn.Module:
        from accelerate import init_empty_weights

        with init_empty_weights():
            return T5ForConditionalGeneration(copy.deepcopy(config))

    def client_stacks(self, config) -> tuple[ClientStack, ...]:
        return (
            ClientStack("encoder.block", stage=0, inputs=("attention_mask",), returns=3),
            ClientStack("decoder.block", stage=1, inputs=("attention_mask", *KEPT), kept=KEPT, returns=3),
        )


def _as_embeddings(loaded: LoadedSpan, hidden: torch.Tensor) -> torch.Tensor:
    """What the masks are made from: the whole model makes them from its embeddings, in the blocks' dtype, even where
    its hidden states between blocks are wider (float32 in float16)."""
    return hidden if hidden.dtype == loaded.dtype else hidden[:, :, :1].to(loaded.dtype)
