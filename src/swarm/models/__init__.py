"""Model families, and the one explicit registry that maps a model to its family.

Most models need no entry: `family_for` serves a checkpoint of a causal LM class (or of a model type that
transformers has a causal LM for, when the checkpoint names no class) with the generic decoder family
(`swarm.models.decoder`), and any other model of transformers with the generic encoder family
(`swarm.models.encoder`); each raises `UnsupportedModelError` for a structure it cannot cut. `FAMILIES` holds,
by `config.model_type` (a diffusers model's class name), the families with a file of their own and the decoders
that need a thin adapter.
"""

from __future__ import annotations

import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from swarm.errors import UnsupportedModelError
from swarm.models.alibi import bloom_alibi, falcon_alibi
from swarm.models.base import ModelFamily
from swarm.models.decoder import DecoderFamily
from swarm.models.encoder import EncoderFamily, dpt_reads_outputs
from swarm.models.encoder_layout import CAUSAL_LM_CLASSES
from swarm.models.llama import llama_layer_forward
from swarm.models.mixtral import fuse_mixtral_experts
from swarm.models.seq2seq import SPEECHT5_EXTRAS, Seq2SeqFamily
from swarm.models.t5 import T5Family
from swarm.models.unet import UNetFamily

FAST_PATHS = {LlamaDecoderLayer: llama_layer_forward}  # exact layer class -> a faster forward, checked at load

FAMILIES: dict[str, ModelFamily] = {
    "t5": T5Family(),
    "UNet2DConditionModel": UNetFamily(),
    "mixtral": DecoderFamily(convert_tensors=fuse_mixtral_experts),
    "bloom": DecoderFamily(position_bias=bloom_alibi, returns=2),
    "falcon": DecoderFamily(position_bias=falcon_alibi, returns=2),
    "dpt": EncoderFamily(reads_outputs=dpt_reads_outputs),
    "whisper": Seq2SeqFamily(encoder_mask=False),
    "speecht5": Seq2SeqFamily(encoder_extras=SPEECHT5_EXTRAS, client_kind="text_to_speech", classes=("SpeechT5ForTextToSpeech",)),
}
CAUSAL_LM = DecoderFamily(fast_paths=FAST_PATHS)  # every other causal LM
ENCODER = EncoderFamily()  # every other model of transformers: served if it is an encoder-only model


def family_for(config) -> ModelFamily:
    """The family that serves `config` (call its `prepare_config` next: it checks the model can be cut), or
    `UnsupportedModelError` naming the model type."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(model_type, "it is an encoder-decoder model, and swarm has no family for it yet")
    architecture = (getattr(config, "architectures", None) or [None])[0]
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (architecture is None or architecture in CAUSAL_LM_CLASSES):
        return CAUSAL_LM
    if model_type in MODEL_MAPPING_NAMES or hasattr(transformers, architecture or ""):
        return ENCODER
    raise UnsupportedModelError(
        model_type, f"it is not a model of transformers nor one of {sorted(FAMILIES)}, which swarm serves"
    )
