"""Llama and every checkpoint with `model_type: llama` (SmolLM2, TinyLlama, Llama 2/3, ...).

Blocks are `model.layers.{i}`; the client keeps `model.embed_tokens`, `model.norm` and `lm_head`
(tied to the embeddings when `tie_word_embeddings` is set, as in SmolLM2).
"""

from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from swarm.models.decoder import DecoderOnlyFamily


class LlamaFamily(DecoderOnlyFamily):
    model_types = ("llama",)
    architectures = ("LlamaForCausalLM",)
    layer_class = LlamaDecoderLayer
    rotary_class = LlamaRotaryEmbedding
    norm_class = LlamaRMSNorm
