"""T5 (`T5ForConditionalGeneration`): an encoder-decoder, cut into blocks numbered in execution order.

Blocks 0..E-1 are `encoder.block.{i}`, blocks E..E+D-1 are `decoder.block.{j}`; the two stacks are
the family's stages, so a server may host a span that crosses from the encoder into the decoder, and
every request stays within one stage. The client keeps the shared embedding, both final layer norms
and the head.

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
from dataclasses import dataclass

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.models.t5.modeling_t5 import T5Attention, T5Block, T5LayerNorm

from swarm.client.seq2seq_lm import DistributedModelForSeq2SeqLM
from swarm.models.base import (
    LoadedSpan,
    ModelFamily,
    Tensors,
    check_hidden_states,
    check_mask,
    check_session_step,
    extend_mask,
    require,
)
from swarm.spans import BlockSpan

ENCODER, DECODER = "encoder", "decoder"


@dataclass
class T5DecoderState:
    """A decoder session: self- and cross-attention caches, the encoder output, and the masks so far."""

    cache: EncoderDecoderCache
    first_layer: int  # server-local index of the session's first block: its layer in the caches
    encoder_hidden_states: torch.Tensor | None = None  # (batch, source_length, d_model)
    encoder_attention_mask: torch.Tensor | None = None  # (batch, source_length)
    attention_mask: torch.Tensor | None = None  # (batch, past_length), None while all ones
    length: int = 0
    batch_size: int | None = None

    def reorder(self, hypo_ids: torch.Tensor):
        self.cache.reorder_cache(hypo_ids)
        for name in ("encoder_hidden_states", "encoder_attention_mask", "attention_mask"):
            if (tensor := getattr(self, name)) is not None:
                setattr(self, name, tensor[hypo_ids.to(tensor.device)])


class T5Family(ModelFamily):
    model_types = ("t5",)
    architectures = ("T5ForConditionalGeneration",)

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

    def block_prefix(self, config, index: int) -> str:
        stack, position = self.stack_of(config, index)
        return f"{stack}.block.{position}."

    def build_block(self, config, index: int, local_index: int):
        stack, position = self.stack_of(config, index)
        return T5Block(self.stack_config(config, stack), has_relative_attention_bias=position == 0, layer_idx=local_index)

    def build_helpers(self, config, device, checkpoint, span: BlockSpan):
        """For each stack the span touches, an attention module holding only its relative position bias."""
        from accelerate import init_empty_weights

        helpers = {}
        for stack in {self.stack_of(config, index)[0] for index in span}:
            with init_empty_weights():
                attention = T5Attention(self.stack_config(config, stack), has_relative_attention_bias=True, layer_idx=0)
            name = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
            weight = checkpoint.load([name])[name]
            attention.relative_attention_bias.weight = torch.nn.Parameter(weight.to(device), requires_grad=False)
            helpers[stack] = attention
        return helpers

    def example_inputs(self, loaded: LoadedSpan) -> Tensors:
        inputs = {"hidden_states": torch.zeros(1, 1, loaded.config.d_model, dtype=loaded.dtype, device=loaded.device)}
        if self.stack_of(loaded.config, loaded.span.start)[0] == DECODER:
            inputs["encoder_hidden_states"] = inputs["hidden_states"].clone()
        return inputs

    def new_session_state(self, loaded: LoadedSpan, sub_span: BlockSpan, max_length: int) -> T5DecoderState:
        require(
            self.stack_of(loaded.config, sub_span.start)[0] == DECODER,
            "sessions run decoder blocks; encoder blocks take plain forward requests",
        )
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        return T5DecoderState(cache=cache, first_layer=sub_span.start - loaded.span.start)

    def state_length(self, state: T5DecoderState) -> int:
        return state.length

    def check_inputs(self, loaded: LoadedSpan, inputs: Tensors, state, max_length, sub_span: BlockSpan):
        d_model, stack = loaded.config.d_model, self.stack_of(loaded.config, sub_span.start)[0]
        batch, tokens = check_hidden_states(loaded, inputs, "hidden_states", d_model)
        allowed = {"hidden_states", "attention_mask"}
        if stack == DECODER:
            allowed |= {"encoder_hidden_states", "encoder_attention_mask", "hypo_ids"}
        require(not set(inputs) - allowed, f"unexpected tensors {sorted(set(inputs) - allowed)} for {stack} blocks")
        check_mask(inputs.get("attention_mask"), "attention_mask", batch, tokens)
        if stack == ENCODER:
            return
        encoder = inputs.get("encoder_hidden_states")
        if state is None or state.encoder_hidden_states is None:
            require(encoder is not None, "decoder blocks need 'encoder_hidden_states' (in a session: with its first step)")
        if encoder is not None:
            require(
                encoder.ndim == 3 and encoder.shape[0] == batch and encoder.shape[2] == d_model,
                f"encoder_hidden_states must have shape ({batch}, source_length, {d_model}), got {tuple(encoder.shape)}",
            )
            require(encoder.dtype == loaded.dtype, f"encoder_hidden_states must be {loaded.dtype}")
            check_mask(inputs.get("encoder_attention_mask"), "encoder_attention_mask", batch, encoder.shape[1])
        if state is not None:
            check_session_step(state, inputs.get("hypo_ids"), batch, tokens, max_length)

    def forward(self, loaded: LoadedSpan, sub_span: BlockSpan, inputs: Tensors, state: T5DecoderState | None) -> Tensors:
        stack = self.stack_of(loaded.config, sub_span.start)[0]
        hidden = inputs["hidden_states"].to(loaded.device)
        if stack == ENCODER:
            return {"hidden_states": self._run_encoder(loaded, sub_span, hidden, inputs.get("attention_mask"))}
        return {"hidden_states": self._run_decoder(loaded, sub_span, hidden, inputs, state)}

    def _run_encoder(self, loaded: LoadedSpan, sub_span: BlockSpan, hidden, mask):
        config = self.stack_config(loaded.config, ENCODER)
        mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=_to(mask, hidden))
        position_bias = loaded.helpers[ENCODER].compute_bias(hidden.shape[1], hidden.shape[1], device=hidden.device)
        for block in loaded.blocks_of(sub_span):
            hidden, position_bias, _ = block(hidden, mask, position_bias)
        return hidden

    def _run_decoder(self, loaded: LoadedSpan, sub_span: BlockSpan, hidden, inputs: Tensors, state):
        config = self.stack_config(loaded.config, DECODER)
        batch, tokens = hidden.shape[:2]
        encoder_hidden, encoder_mask = inputs.get("encoder_hidden_states"), inputs.get("encoder_attention_mask")
        past, cache, mask, first_layer = 0, None, inputs.get("attention_mask"), None
        if state is not None:
            if (hypo_ids := inputs.get("hypo_ids")) is not None:
                state.reorder(hypo_ids.to(loaded.device))
            if encoder_hidden is not None:
                state.encoder_hidden_states, state.encoder_attention_mask = encoder_hidden, encoder_mask
            encoder_hidden, encoder_mask = state.encoder_hidden_states, state.encoder_attention_mask
            past, cache, first_layer = state.length, state.cache, state.first_layer
            mask = extend_mask(state.attention_mask, mask, batch, past, tokens)
        encoder_hidden = encoder_hidden.to(loaded.device)
        self_cache = cache.self_attention_cache if cache is not None else None
        causal_mask = create_causal_mask(
            config=config, inputs_embeds=hidden, attention_mask=_to(mask, hidden), cache=self_cache, layer_idx=first_layer
        )
        cross_mask = create_bidirectional_mask(
            config=config,
            inputs_embeds=hidden,
            attention_mask=_to(encoder_mask, hidden),
            encoder_hidden_states=encoder_hidden,
        )
        position_bias = loaded.helpers[DECODER].compute_bias(tokens, past + tokens, hidden.device, past_seen_tokens=past)
        cross_bias = None
        for block in loaded.blocks_of(sub_span):
            hidden, position_bias, cross_bias = block(
                hidden, causal_mask, position_bias, encoder_hidden, cross_mask, cross_bias, cache=cache
            )
        if state is not None:
            state.attention_mask, state.length, state.batch_size = mask, past + tokens, batch
        return hidden

    # Client side: the shared embedding, the final norms and the head stay on the client.

    def client_model(self, path, config, remote, dtype):
        return DistributedModelForSeq2SeqLM.from_checkpoint(path, config, self, remote, dtype)

    def client_module_names(self) -> tuple[str, ...]:
        return ("shared", "encoder.final_layer_norm", "decoder.final_layer_norm", "lm_head")

    def build_client_modules(self, config) -> dict[str, torch.nn.Module]:
        return {
            "shared": torch.nn.Embedding(config.vocab_size, config.d_model),
            "encoder.final_layer_norm": T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon),
            "decoder.final_layer_norm": T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon),
            "lm_head": torch.nn.Linear(config.d_model, config.vocab_size, bias=False),
        }

    def tie_client_weights(self, model, config):
        if getattr(config, "tie_word_embeddings", False):
            model.lm_head.weight = model.shared.weight


def _to(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return mask.to(like.device) if mask is not None else None


