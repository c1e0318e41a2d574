"""A sequence-to-sequence model whose encoder and decoder blocks run in the swarm while the rest runs here.

It is the model's own class (`T5ForConditionalGeneration`, `WhisperForConditionalGeneration`, ...) with both
stacks of blocks in the swarm (see `swarm.client.base`): `model(input_ids, decoder_input_ids=...)` (or
`model(input_features=..., decoder_input_ids=...)`) returns `.logits` like the local model, and `.generate()`
works with greedy decoding, sampling and beam search (`num_beams`), as do the pipelines that call it. The
encoder's blocks run as one forward pass through the encoder's servers; the decoder's run in an inference
session whose servers keep the encoder output (sent with the first step) and both attention caches. Each
decoding that `GenerationMixin.generate` starts gets a session of its own: Whisper's long-form transcription
decodes every 30-second window (and each temperature fallback) afresh. Assisted decoding
(`prompt_lookup_num_tokens=...`, `assistant_model=...`) sends a step's draft tokens through the decoder's servers
at once and crops the ones not accepted, as for a causal LM.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers.generation.configuration_utils import GenerationMode

from swarm.client.base import SessionCache, SwarmModelMixin


class DistributedModelForSeq2SeqLM(SwarmModelMixin):
    """Mixed in front of a sequence-to-sequence model's own class: its forward and `generate()` in sessions."""

    def forward(self, *args, cache=None, use_cache: bool | None = None, **kwargs):
        """The model's own forward, with no local cache (in a session, the decoder's servers hold it, and
        the decoder's new positions are numbered from the session's)."""
        session = self.step_session() if use_cache is not False else None
        if session is not None and takes_decoder_position_ids(type(self)) and kwargs.get("decoder_position_ids") is None:
            decoder_inputs = kwargs.get("decoder_input_ids")
            if decoder_inputs is None:
                decoder_inputs = kwargs.get("decoder_inputs_embeds")
            if decoder_inputs is not None:
                tokens = decoder_inputs.shape[1]
                positions = torch.arange(session.position, session.position + tokens, device=decoder_inputs.device)
                kwargs["decoder_position_ids"] = positions.unsqueeze(0).expand(decoder_inputs.shape[0], -1)
        with self._without_session(use_cache is False):
            outputs = super().forward(*args, cache=None, use_cache=False, **kwargs)
        if isinstance(cache, SessionCache):
            outputs.cache = cache  # assisted decoding crops it
        return outputs

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """The model's `generate`, each decoding it starts in an inference session of its own (or all of them
        in the active session)."""
        args = (inputs, *args) if inputs is not None else args  # Whisper's generate names its first `input_features`
        if self.active_session is not None or kwargs.get("use_cache") is False:
            return super().generate(*args, **kwargs)
        self._swarm_local.generating = True
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._swarm_local.generating = False
            self._end_generation_session()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode=None, *args, **kwargs):
        """Called once by each decoding `GenerationMixin.generate` starts: its session opens here."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, *args, **kwargs)
        if getattr(self._swarm_local, "generating", False):
            self._end_generation_session()
            drafts = _drafts(generation_config) if generation_mode == GenerationMode.ASSISTED_GENERATION else 0
            context = self.inference_session(max_length=generation_config.max_length + drafts)
            context.__enter__()
            self._swarm_local.generation_session = context
        if generation_mode == GenerationMode.ASSISTED_GENERATION and self.active_session is not None:
            model_kwargs["cache"] = SessionCache(self.active_session)

    def _end_generation_session(self):
        context, self._swarm_local.generation_session = getattr(self._swarm_local, "generation_session", None), None
        if context is not None:
            context.__exit__(None, None, None)


def _drafts(generation_config) -> int:
    """Draft positions that assisted decoding's last step may run past `max_length`, before cropping them."""
    return generation_config.prompt_lookup_num_tokens or generation_config.num_assistant_tokens or 20


@functools.cache
def takes_decoder_position_ids(model_class: type) -> bool:
    forward = super(DistributedModelForSeq2SeqLM, model_class).forward
    return "decoder_position_ids" in inspect.signature(forward).parameters
