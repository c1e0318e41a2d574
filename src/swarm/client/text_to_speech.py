"""A text-to-speech model whose encoder and decoder blocks run in the swarm while the rest runs here.

It is the model's own class (`SpeechT5ForTextToSpeech`) with both stacks of blocks in the swarm (see
`swarm.client.base`): its text pre-net, speech pre-net and post-net run here, and so does a vocoder given to
`generate(..., vocoder=...)` or to `pipeline("text-to-speech", ..., vocoder=...)`. Each `generate()` (or
`generate_speech()`) call runs its decoding loop in one inference session, whose decoder servers keep the
encoder output and both attention caches; the session is sized for the longest spectrogram the call may
make (`maxlenratio` times the text's length, in frames of `reduction_factor`).
"""

from __future__ import annotations

import contextlib
import inspect

from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_TO_SPECTROGRAM_MAPPING

from swarm.client.base import SwarmModelMixin
from swarm.errors import UnsupportedModelError


class DistributedModelForTextToSpeech(SwarmModelMixin):
    """Mixed in front of a text-to-speech model's own class: its `generate()` in an inference session."""

    @classmethod
    def from_swarm(cls, *args, **kwargs):
        model = super().from_swarm(*args, **kwargs)
        # the text-to-speech pipeline runs its vocoder only for the classes of this mapping
        MODEL_FOR_TEXT_TO_SPECTROGRAM_MAPPING.register(f"swarm:{type(model).__name__}", type(model), exist_ok=True)
        return model

    def generate(self, *args, **kwargs):
        with self._speech_session(super().generate, args, kwargs):
            return super().generate(*args, **kwargs)

    def generate_speech(self, *args, **kwargs):
        with self._speech_session(super().generate_speech, args, kwargs):
            return super().generate_speech(*args, **kwargs)

    def _speech_session(self, method, args: tuple, kwargs: dict):
        arguments = inspect.signature(method).bind(*args, **kwargs)
        arguments.apply_defaults()
        if arguments.arguments.get("output_cross_attentions"):
            raise UnsupportedModelError(self.config.model_type, "the swarm does not return the cross-attentions of its blocks")
        if self.active_session is not None:
            return contextlib.nullcontext()
        text_length = arguments.arguments["input_ids"].shape[1]
        frames = int(text_length * arguments.arguments["maxlenratio"] / self.config.reduction_factor)
        return self.inference_session(max_length=max(frames, 1))
