"""Model families, and the one explicit registry that maps a model to its family.

Most causal LMs need no entry: `family_for` serves every model type that transformers has a causal LM for
with the generic decoder family (`swarm.models.decoder`), which raises `UnsupportedModelError` for a structure
it cannot cut. `FAMILIES` holds, by `config.model_type` (a diffusers model's class name), the families with a
file of their own and the decoders that need a thin adapter.
"""

from __future__ import annotations

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from swarm.errors import UnsupportedModelError
from swarm.models.alibi import bloom_alibi, falcon_alibi
from swarm.models.base import ModelFamily
from swarm.models.decoder import DecoderFamily
from swarm.models.llama import llama_layer_forward
from swarm.models.mixtral import fuse_mixtral_experts
from swarm.models.t5 import T5Family
from swarm.models.unet import UNetFamily

FAST_PATHS = {LlamaDecoderLayer: llama_layer_forward}  # exact layer class -> a faster forward, checked at load

FAMILIES: dict[str, ModelFamily] = {
    "t5": T5Family(),
    "UNet2DConditionModel": UNetFamily(),
    "mixtral": DecoderFamily(convert_tensors=fuse_mixtral_experts),
    "bloom": DecoderFamily(position_bias=bloom_alibi, returns=2),
    "falcon": DecoderFamily(position_bias=falcon_alibi, returns=2),
}
CAUSAL_LM = DecoderFamily(fast_paths=FAST_PATHS)  # every other causal LM


def family_for(config) -> ModelFamily:
    """The family that serves `config` (call its `prepare_config` next: it checks the model can be cut), or
    `UnsupportedModelError` naming the model type."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return CAUSAL_LM
    raise UnsupportedModelError(
        model_type, f"it is not a causal LM of transformers nor one of {sorted(FAMILIES)}, which swarm serves"
    )
