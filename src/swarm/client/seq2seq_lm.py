"""A sequence-to-sequence LM whose encoder and decoder blocks run in the swarm while the rest runs here.

It is the model's own class (`T5ForConditionalGeneration`, ...) with both stacks of blocks in the swarm (see
`swarm.client.base`): `model(input_ids, decoder_input_ids=...)` returns `.logits` like the local model, and
`.generate()` works with greedy decoding, sampling and beam search (`num_beams`). The encoder's blocks run as
one forward pass through the encoder's servers; the decoder's run in an inference session whose servers keep
the encoder output (sent with the first step) and both attention caches.
"""

from __future__ import annotations

import torch

from swarm.client.base import SwarmModelMixin


class DistributedModelForSeq2SeqLM(SwarmModelMixin):
    """Mixed in front of a sequence-to-sequence LM's own class: its forward and `generate()` in sessions."""

    def forward(self, *args, cache=None, use_cache: bool | None = None, **kwargs):
        """The model's own forward, with no local cache (in a session, the decoder's servers hold it)."""
        with self._without_session(use_cache is False):
            return super().forward(*args, cache=None, use_cache=False, **kwargs)

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """`GenerationMixin.generate` with the decoder in an inference session (the active one or a new one)."""
        if self.active_session is not None or kwargs.get("use_cache") is False:
            return super().generate(inputs, *args, **kwargs)
        config = kwargs.get("generation_config") or self.generation_config
        max_new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        max_length = max_new_tokens + 1 if max_new_tokens is not None else kwargs.get("max_length", config.max_length)
        with self.inference_session(max_length=max_length):
            return super().generate(inputs, *args, **kwargs)
