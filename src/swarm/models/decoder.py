"""What decoder-only families (Llama, Mixtral, ...) share: a stack of layers, rotary positions, a KV cache.

A request to a span carries:
    hidden_states   (batch, new_tokens, hidden_size)  in the server's dtype
    position_ids    (batch or 1, new_tokens)           int64, optional (default: next positions)
    attention_mask  (batch, new_tokens)                0/1 for the new tokens, optional (default: all 1)
    hypo_ids        (batch,)                           int64, optional: reorders a session's cache first
                                                       (beam search keeps the beams it continues)
and the reply carries `hidden_states` of the same shape. A session keeps the KV cache of its blocks
and the attention mask of every position so far, so steps send only new tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from swarm.client.causal_lm import DistributedModelForCausalLM
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

logger = logging.getLogger(__name__)


@dataclass
class DecoderState:
    """A session's state on one server: the KV cache of its blocks and the mask of past positions."""

    cache: DynamicCache
    first_layer: int  # server-local index of the session's first block: its layer in the cache
    attention_mask: torch.Tensor | None = None  # (batch, past_length), None while it is all ones
    length: int = 0  # positions processed so far
    batch_size: int | None = None

    def reorder(self, hypo_ids: torch.Tensor):
        """Keeps, for each row, the history of row `hypo_ids[row]` (beam search)."""
        self.cache.reorder_cache(hypo_ids)
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[hypo_ids.to(self.attention_mask.device)]


class DecoderOnlyFamily(ModelFamily):
    """A causal decoder whose blocks are `{layers_prefix}{i}`, called with rotary position embeddings."""

    layers_prefix = "model.layers."
    layer_class: type = None  # the decoder layer class, called with keywords only
    rotary_class: type = None  # computes (cos, sin) from position ids; it has no weights
    norm_class: type = None  # the final norm's class
    embeddings_module = "model.embed_tokens"  # client-side modules, by their checkpoint prefix
    final_norm_module = "model.norm"
    head_module = "lm_head"
    # fast_layer_forward(layer, hidden_states, attention_mask, position_embeddings, position_ids, cache) -> hidden
    # states: what `layer(...)` returns, computed with less overhead; None to call the layers themselves
    fast_layer_forward: Callable | None = None

    def num_blocks(self, config) -> int:
        return config.num_hidden_layers

    def prepare_config(self, config):
        config._attn_implementation = "sdpa"
        return config

    def block_prefix(self, config, index: int) -> str:
        return f"{self.layers_prefix}{index}."

    def build_block(self, config, index: int, local_index: int):
        return self.layer_class(config, layer_idx=local_index)

    def build_helpers(self, config, device, checkpoint, span):
        return {"rotary": self.rotary_class(config=config).to(device)}

    def new_session_state(self, loaded: LoadedSpan, sub_span: BlockSpan, max_length: int) -> DecoderState:
        return DecoderState(cache=DynamicCache(), first_layer=sub_span.start - loaded.span.start)

    def example_inputs(self, loaded: LoadedSpan) -> Tensors:
        hidden_size = loaded.config.hidden_size
        return {"hidden_states": torch.zeros(1, 1, hidden_size, dtype=loaded.dtype, device=loaded.device)}

    def state_length(self, state: DecoderState) -> int:
        return state.length

    def check_inputs(self, loaded: LoadedSpan, inputs: Tensors, state: DecoderState | None, max_length, sub_span):
        batch, tokens = check_hidden_states(loaded, inputs, "hidden_states", loaded.config.hidden_size)
        unexpected = set(inputs) - {"hidden_states", "position_ids", "attention_mask", "hypo_ids"}
        require(not unexpected, f"unexpected tensors {sorted(unexpected)}")
        positions = inputs.get("position_ids")
        if positions is not None:
            require(
                positions.dtype == torch.int64 and positions.ndim == 2 and positions.shape[0] in (1, batch),
                f"position_ids must be int64 of shape (batch or 1, {tokens}), got {positions.dtype} {tuple(positions.shape)}",
            )
            require(positions.shape[1] == tokens, f"position_ids cover {positions.shape[1]} tokens, not {tokens}")
            require(bool((positions >= 0).all()), "position_ids must not be negative")
        check_mask(inputs.get("attention_mask"), "attention_mask", batch, tokens)
        if state is not None:
            check_session_step(state, inputs.get("hypo_ids"), batch, tokens, max_length)
        else:
            require("hypo_ids" not in inputs, "hypo_ids only make sense in a session")

    def forward(self, loaded: LoadedSpan, sub_span: BlockSpan, inputs: Tensors, state: DecoderState | None) -> Tensors:
        hidden = inputs["hidden_states"].to(loaded.device)
        batch, tokens = hidden.shape[:2]
        past = state.length if state is not None else 0
        positions = inputs.get("position_ids")
        if positions is None:
            positions = torch.arange(past, past + tokens).unsqueeze(0)
        positions = positions.to(loaded.device)
        new_mask = inputs.get("attention_mask")
        if state is None:
            cache, mask, first_layer = None, new_mask, 0
        else:
            if (hypo_ids := inputs.get("hypo_ids")) is not None:
                state.reorder(hypo_ids.to(loaded.device))
            mask = extend_mask(state.attention_mask, new_mask, batch, past, tokens)
            cache, first_layer = state.cache, state.first_layer
        causal_mask = self.make_causal_mask(loaded, hidden, mask, cache, positions, first_layer)
        position_embeddings = loaded.helpers["rotary"](hidden, position_ids=positions)
        for block in loaded.blocks_of(sub_span):
            if loaded.fast_path:
                hidden = self.fast_layer_forward(block, hidden, causal_mask, position_embeddings, positions, cache)
                continue
            hidden = block(
                hidden_states=hidden,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=positions,
                cache=cache,
                use_cache=cache is not None,
            )
        if state is not None:
            state.attention_mask, state.length, state.batch_size = mask, past + tokens, batch
        return {"hidden_states": hidden}

    def check_fast_path(self, loaded: LoadedSpan) -> bool:
        """Runs the first block both ways (prefills with and without padding, a step, a forward without a
        session) and keeps the fast path only if every output is bitwise the same."""
        if self.fast_layer_forward is None:
            return False
        try:
            same = all(map(torch.equal, self._probe(loaded, fast=False), self._probe(loaded, fast=True)))
            reason = "its outputs differ"
        except Exception as error:
            same, reason = False, repr(error)
        finally:
            loaded.fast_path = False
        if not same:
            logger.warning(
                f"Not using the fast path of {type(self).__name__} on blocks {loaded.span}: {reason}; "
                "using the layers as they are"
            )
        return same

    def _probe(self, loaded: LoadedSpan, fast: bool) -> list[torch.Tensor]:
        loaded.fast_path = fast
        first = BlockSpan(loaded.span.start, loaded.span.start + 1)
        generator = torch.Generator().manual_seed(0)
        prefill, step = (
            torch.randn(2, tokens, loaded.config.hidden_size, generator=generator).to(loaded.device, loaded.dtype)
            for tokens in (5, 1)
        )
        outputs = []
        with torch.inference_mode():
            for mask in (None, torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])):
                state = self.new_session_state(loaded, first, max_length=6)
                outputs.append(self.forward(loaded, first, {"hidden_states": prefill, "attention_mask": mask}, state))
                outputs.append(self.forward(loaded, first, {"hidden_states": step}, state))
            outputs.append(self.forward(loaded, first, {"hidden_states": prefill}, None))
        return [output["hidden_states"] for output in outputs]

    def make_causal_mask(self, loaded: LoadedSpan, hidden, mask, cache, positions, first_layer: int):
        mask = mask.to(hidden.device) if mask is not None else None
        return create_causal_mask(
            config=loaded.config,
            inputs_embeds=hidden,
            attention_mask=mask,
            cache=cache,
            position_ids=positions,
            layer_idx=first_layer if cache is not None else None,
        )

    # Client side: embeddings, final norm and head stay on the client.

    def client_model(self, path, config, remote, dtype):
        return DistributedModelForCausalLM.from_checkpoint(path, config, self, remote, dtype)

    def client_module_names(self) -> tuple[str, ...]:
        return (self.embeddings_module, self.final_norm_module, self.head_module)

    def build_client_modules(self, config) -> dict[str, torch.nn.Module]:
        return {
            self.embeddings_module: torch.nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id),
            self.final_norm_module: self.norm_class(config.hidden_size, eps=config.rms_norm_eps),
            self.head_module: torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False),
        }

    def tie_client_weights(self, model, config):
        if getattr(config, "tie_word_embeddings", False):
            model.get_submodule(self.head_module).weight = model.get_submodule(self.embeddings_module).weight

    def embed(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        return model.get_submodule(self.embeddings_module)(input_ids)

    def head(self, model, hidden_states: torch.Tensor) -> torch.Tensor:
        return model.get_submodule(self.head_module)(model.get_submodule(self.final_norm_module)(hidden_states))
