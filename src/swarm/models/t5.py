"""T5 (`T5ForConditionalGeneration`): an encoder-decoder, cut into blocks numbered in execution order.

Blocks 0..E-1 are `encoder.block.{i}`, blocks E..E+D-1 are `decoder.block.{j}`; the two stacks are the
family's stages, so a server may host a span that crosses from the encoder into the decoder, and every
request stays within one stage. Each block keeps its index within its stack, as in the whole model.

Encoder request (no session):  hidden_states (B, S, d_model), attention_mask (B, S) optional.
Decoder request:               hidden_states (B, T, d_model), attention_mask (B, T) optional,
                               encoder_hidden_states (B, S, d_model) and encoder_attention_mask (B, S):
                               with every forward, and with the first step of a session, which keeps
                               them; hypo_ids (B,) optional in a session (beam search).

Only block 0 of each stack owns `relative_attention_bias`. Each server loads that small embedding
(buckets x heads) for every stack it serves and computes the position bias itself, so a span may start
anywhere. A decoder session keeps its self- and cross-attention caches and the encoder output.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, T5ForConditionalGeneration
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.models.t5.modeling_t5 import T5Attention, T5Block

from swarm.models.base import LAYER_OUTPUT, ClientStack, LoadedSpan, ModelFamily, Tensors
from swarm.models.checks import check_hidden_states, check_mask, check_names, check_output_layers, require
from swarm.models.state import SequenceState
from swarm.spans import BlockSpan

ENCODER, DECODER = "encoder", "decoder"
KEPT = ("encoder_hidden_states", "encoder_attention_mask")  # what a decoder session keeps from its first step
RELATIVE_BIAS = "{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"  # every server of a stack needs it


class T5Family(ModelFamily):
    client_kind = "seq2seq_lm"

    def num_blocks(self, config) -> int:
        return config.num_layers + config.num_decoder_layers

    def stages(self, config) -> list[BlockSpan]:
        return [BlockSpan(0, config.num_layers), BlockSpan(config.num_layers, self.num_blocks(config))]

    def prepare_config(self, config):
        config._attn_implementation = "sdpa"
        return config

    def stack_of(self, config, index: int) -> tuple[str, int]:
        """("encoder", i) or ("decoder", j) for global block `index`."""
        return (ENCODER, index) if index < config.num_layers else (DECODER, index - config.num_layers)

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

    def example_inputs(self, loaded: LoadedSpan) -> Tensors:
        inputs = {"hidden_states": torch.zeros(1, 1, loaded.config.d_model, dtype=loaded.dtype, device=loaded.device)}
        if self.stack_of(loaded.config, loaded.span.start)[0] == DECODER:
            inputs["encoder_hidden_states"] = inputs["hidden_states"].clone()
        return inputs

    def new_session_state(self, loaded: LoadedSpan, sub_span: BlockSpan, max_length: int) -> SequenceState:
        require(
            self.stack_of(loaded.config, sub_span.start)[0] == DECODER,
            "sessions run decoder blocks; encoder blocks take plain forward requests",
        )
        return SequenceState(cache=EncoderDecoderCache(DynamicCache(), DynamicCache()))

    def check_inputs(self, loaded: LoadedSpan, inputs: Tensors, state, max_length, sub_span: BlockSpan, phase):
        d_model, stack = loaded.config.d_model, self.stack_of(loaded.config, sub_span.start)[0]
        batch, tokens = check_hidden_states(inputs, "hidden_states", d_model, loaded.dtype)
        allowed = {"hidden_states", "attention_mask", "output_layers"} | ({*KEPT, "hypo_ids"} if stack == DECODER else set())
        check_names(inputs, allowed, f"{stack} blocks")
        check_mask(inputs.get("attention_mask"), "attention_mask", batch, tokens)
        check_output_layers(inputs.get("output_layers"), self.num_blocks(loaded.config))
        if stack == ENCODER:
            return
        encoder = inputs.get("encoder_hidden_states")
        if state is None or "encoder_hidden_states" not in state.kept:
            require(encoder is not None, "decoder blocks need 'encoder_hidden_states' (in a session: with its first step)")
        if encoder is not None:
            require(
                encoder.ndim == 3 and encoder.shape[0] == batch and encoder.shape[2] == d_model,
                f"encoder_hidden_states must have shape ({batch}, source_length, {d_model}), got {tuple(encoder.shape)}",
            )
            require(encoder.dtype == loaded.dtype, f"encoder_hidden_states must be {loaded.dtype}")
            check_mask(inputs.get("encoder_attention_mask"), "encoder_attention_mask", batch, encoder.shape[1])
        if state is not None:
            state.check_step(inputs.get("hypo_ids"), batch, tokens, max_length)

    def forward(self, loaded: LoadedSpan, sub_span: BlockSpan, inputs: Tensors, state, phase) -> Tensors:
        stack = self.stack_of(loaded.config, sub_span.start)[0]
        hidden = inputs["hidden_states"].to(loaded.device)
        wanted = set(inputs["output_layers"].tolist()) if "output_layers" in inputs else set()
        outputs = {}  # the outputs of the blocks in `wanted`, by their reply names

        def keep(index: int, output: torch.Tensor):
            if index in wanted:
                outputs[LAYER_OUTPUT.format(index)] = output

        if stack == ENCODER:
            hidden = self._run_encoder(loaded, sub_span, hidden, inputs.get("attention_mask"), keep)
        else:
            hidden = self._run_decoder(loaded, sub_span, hidden, inputs, state, keep)
        return {"hidden_states": hidden, **outputs}

    def _run_encoder(self, loaded: LoadedSpan, sub_span: BlockSpan, hidden, mask, keep):
        config = self.stack_config(loaded.config, ENCODER)
        mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=_to(mask, hidden))
        position_bias = loaded.helpers[ENCODER].compute_bias(hidden.shape[1], hidden.shape[1], device=hidden.device)
        for index, block in zip(sub_span, loaded.blocks_of(sub_span)):
            hidden, position_bias, _ = block(hidden, mask, position_bias)
            keep(index, hidden)
        return hidden

    def _run_decoder(self, loaded: LoadedSpan, sub_span: BlockSpan, hidden, inputs: Tensors, state, keep):
        config = self.stack_config(loaded.config, DECODER)
        batch, tokens = hidden.shape[:2]
        kept = {name: inputs[name] for name in KEPT if inputs.get(name) is not None}
        past, cache, mask = 0, None, inputs.get("attention_mask")
        if state is not None:
            if (hypo_ids := inputs.get("hypo_ids")) is not None:
                state.reorder(hypo_ids.to(loaded.device))
            if "encoder_hidden_states" in kept:
                state.kept = {name: tensor.to(loaded.device) for name, tensor in kept.items()}
            kept, past, cache = state.kept, state.length, state.cache
            mask = state.mask_with(mask, batch, tokens)
        encoder_hidden = kept["encoder_hidden_states"].to(loaded.device)
        self_cache = cache.self_attention_cache if cache is not None else None
        first_layer = self.stack_of(loaded.config, sub_span.start)[1]
        causal_mask = create_causal_mask(
            config=config, inputs_embeds=hidden, attention_mask=_to(mask, hidden), cache=self_cache, layer_idx=first_layer
        )
        cross_mask = create_bidirectional_mask(
            config=config,
            inputs_embeds=hidden,
            attention_mask=_to(kept.get("encoder_attention_mask"), hidden),
            encoder_hidden_states=encoder_hidden,
        )
        position_bias = loaded.helpers[DECODER].compute_bias(tokens, past + tokens, hidden.device, past_seen_tokens=past)
        cross_bias = None
        for index, block in zip(sub_span, loaded.blocks_of(sub_span)):
            hidden, position_bias, cross_bias = block(
                hidden, causal_mask, position_bias, encoder_hidden, cross_mask, cross_bias, cache=cache
            )
            keep(index, hidden)
        if state is not None:
            state.advance(mask, batch, tokens)
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


def _to(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return mask.to(like.device) if mask is not None else None
