"""A causal LM whose embeddings and head run here while its blocks run in the swarm.

It is the model's own class (`LlamaForCausalLM`, `Gemma2ForCausalLM`, `GPT2LMHeadModel`, ...) with its layers in
the swarm (see `swarm.client.base`): `model(input_ids)` returns `.logits` as the local model computes them, and
`.generate()` takes the usual arguments (greedy, sampling, beam search, streamers, batches with left padding).
Each `.generate()` call runs in an inference session, so every step sends only the new token through the
servers; inside `with model.inference_session(max_length=...)`, successive calls continue one conversation.
Assisted decoding (`prompt_lookup_num_tokens=...`, `assistant_model=...`) runs as transformers runs it: each step
sends the draft tokens through the servers at once, and the ones not accepted are cropped from their caches.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
from transformers.generation.configuration_utils import GenerationMode
from transformers.utils import ModelOutput

from swarm.client.base import SessionCache, SwarmModelMixin
from swarm.client.session import InferenceSession

logger = logging.getLogger(__name__)


class DistributedModelForCausalLM(SwarmModelMixin):
    """Mixed in front of a causal LM's own class: its forward and `generate()` in inference sessions."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        **kwargs,
    ):
        """The model's own forward, with no local cache: in a session, the servers hold it, and only the
        positions they have not seen are run."""
        session = self.active_session if use_cache is not False else None
        if session is not None:
            skip, session.skip_tokens = session.skip_tokens, 0
            input_ids = input_ids[:, skip:] if input_ids is not None else None
            inputs_embeds = inputs_embeds[:, skip:] if inputs_embeds is not None else None
            tokens = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            if position_ids is None:
                position_ids = torch.arange(session.position, session.position + tokens).unsqueeze(0)
            position_ids = position_ids[:, -tokens:]
        if attention_mask is not None and attention_mask.ndim == 2 and bool(attention_mask.all()):
            attention_mask = None  # the same for the model, and it spares it a mask of every position
        if position_ids is not None and takes_position_ids(type(self)):
            kwargs["position_ids"] = position_ids  # models with alibi (Bloom) have none
        with self._without_session(use_cache is False):
            outputs = super().forward(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, cache=None, use_cache=False, **kwargs
            )
        if isinstance(cache, SessionCache):
            outputs.cache = cache  # assisted decoding crops it
        return outputs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode=None, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, *args, **kwargs)
        if generation_mode == GenerationMode.ASSISTED_GENERATION and self.active_session is not None:
            model_kwargs["cache"] = SessionCache(self.active_session)

    def generate(self, inputs: torch.Tensor | None = None, *args, session: InferenceSession | None = None, **kwargs):
        """`GenerationMixin.generate` in an inference session: the given one, the active one, or a new one.

        In a session that already holds a conversation, `inputs` are the new tokens of this turn (or the whole
        conversation so far, whose processed prefix is not sent again); the result starts where `inputs` start
        (with `inputs=None`, the conversation simply goes on and the result holds only the new tokens).
        """
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        session = session or self.active_session
        if kwargs.get("use_cache") is False:
            return super().generate(inputs, *args, **kwargs)
        if session is None:
            max_length = self._session_length(inputs, kwargs)
            with self.inference_session(max_length=max_length) as session:
                return self._generate_in_session(session, inputs, *args, **kwargs)
        with self._use_session(session):
            return self._generate_in_session(session, inputs, *args, **kwargs)

    def _generate_in_session(self, session: InferenceSession, inputs, *args, **kwargs):
        history, crop = session.output_ids, 0
        if history is not None:
            inputs, crop, kwargs["attention_mask"] = _continue_conversation(
                history, session.output_mask, inputs, kwargs.get("attention_mask")
            )
            session.skip_tokens = session.position
        result = super().generate(inputs, *args, **kwargs)
        sequences = result.sequences if isinstance(result, ModelOutput) else result
        mask = kwargs.get("attention_mask")
        if mask is not None:
            generated = sequences.shape[1] - mask.shape[1]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], generated)], dim=1)
        session.output_ids, session.output_mask = sequences, mask
        if not crop:
            return result
        if isinstance(result, ModelOutput):
            result.sequences = sequences[:, crop:]
            return result
        return sequences[:, crop:]

    def _session_length(self, inputs: torch.Tensor | None, kwargs: dict) -> int:
        config = kwargs.get("generation_config") or self.generation_config
        prompt_length = inputs.shape[1] if inputs is not None else 1
        max_new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        drafts = 0  # assisted decoding's last step may run draft tokens past the end, before cropping them
        if kwargs.get("prompt_lookup_num_tokens") or config.prompt_lookup_num_tokens:
            drafts = kwargs.get("prompt_lookup_num_tokens") or config.prompt_lookup_num_tokens
        elif kwargs.get("assistant_model") is not None:
            drafts = kwargs.get("num_assistant_tokens") or config.num_assistant_tokens or 20
        if max_new_tokens is not None:
            return prompt_length + max_new_tokens + drafts
        return max(kwargs.get("max_length", config.max_length) or 0, prompt_length + 1) + drafts


def _continue_conversation(history, history_mask, inputs, mask):
    """Joins a session's past tokens with this turn's inputs; returns (all tokens, tokens to crop, mask)."""
    if inputs is None:
        return history, history.shape[1], history_mask
    if inputs.shape[1] >= history.shape[1] and torch.equal(inputs[:, : history.shape[1]], history):
        return inputs, 0, mask
    if history_mask is not None or mask is not None:
        history_mask = history_mask if history_mask is not None else torch.ones_like(history)
        mask = torch.cat([history_mask, mask if mask is not None else torch.ones_like(inputs)], dim=1)
    return torch.cat([history, inputs], dim=1), history.shape[1], mask


@functools.cache
def takes_position_ids(model_class: type) -> bool:
    return "position_ids" in inspect.signature(super(DistributedModelForCausalLM, model_class).forward).parameters
