"""A sequence-to-sequence LM (T5) whose embedding, final norms and head run here while its encoder and
decoder blocks run in the swarm.

`model(input_ids, decoder_input_ids=...)` returns `.logits` like `AutoModelForSeq2SeqLM`, and
`.generate()` works with greedy decoding, sampling and beam search (`num_beams`). The encoder runs
as one forward pass through the encoder's servers; the decoder runs in an inference session whose
servers keep the encoder output and both attention caches.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from transformers.generation import GenerationMixin

from swarm.client.base import DistributedPreTrainedModel


class RemoteEncoder(nn.Module):
    """The encoder as `generate()` expects it: embeddings here, blocks in the swarm, final norm here."""

    main_input_name = "input_ids"

    def __init__(self, model: "DistributedModelForSeq2SeqLM"):
        super().__init__()
        self._model = [model]  # a list, so that the parent is not registered as a submodule

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ) -> BaseModelOutput:
        model = self._model[0]
        hidden = model.shared(input_ids) if inputs_embeds is None else inputs_embeds
        tensors = {"hidden_states": hidden, "attention_mask": attention_mask}
        hidden = model.remote.forward(tensors, model.family.stages(model.config)[0])["hidden_states"]
        return BaseModelOutput(last_hidden_state=self.final_layer_norm(hidden))


class DistributedModelForSeq2SeqLM(DistributedPreTrainedModel, GenerationMixin):
    base_model_prefix = ""

    def __init__(self, config, family, remote):
        super().__init__(config, family, remote)
        encoder_norm = self.encoder.final_layer_norm
        self.encoder = RemoteEncoder(self)
        self.encoder.final_layer_norm = encoder_norm

    def get_encoder(self, *args, **kwargs):
        return self.encoder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs=None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs[0])
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError("pass decoder_input_ids or decoder_inputs_embeds")
        hidden = self.shared(decoder_input_ids) if decoder_inputs_embeds is None else decoder_inputs_embeds
        tokens = hidden.shape[1]
        tensors = {
            "hidden_states": hidden,
            "attention_mask": decoder_attention_mask[:, -tokens:] if decoder_attention_mask is not None else None,
        }
        encoder = {"encoder_hidden_states": encoder_outputs.last_hidden_state, "encoder_attention_mask": attention_mask}
        session = self.active_session if use_cache is not False else None
        if session is not None:
            hypo_ids = session.take_hypo_ids()
            tensors.update(encoder if session.position == 0 else {"hypo_ids": hypo_ids})
            hidden = session.step(tensors)["hidden_states"]
        else:
            hidden = self.remote.forward({**tensors, **encoder}, self.session_span)["hidden_states"]
        hidden = self.decoder.final_layer_norm(hidden)
        if getattr(self.config, "scale_decoder_outputs", self.config.tie_word_embeddings):
            hidden = hidden * self.config.d_model**-0.5
        return Seq2SeqLMOutput(logits=self.lm_head(hidden), encoder_last_hidden_state=encoder_outputs.last_hidden_state)

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """`GenerationMixin.generate` with the decoder in an inference session (the active one or a new one)."""
        if self.active_session is not None or kwargs.get("use_cache") is False:
            return super().generate(inputs, *args, **kwargs)
        config = kwargs.get("generation_config") or self.generation_config
        max_new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        max_length = max_new_tokens + 1 if max_new_tokens is not None else kwargs.get("max_length", config.max_length)
        with self.inference_session(max_length=max_length):
            return super().generate(inputs, *args, **kwargs)
