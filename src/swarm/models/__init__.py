"""Model families, one file each, registered in `FAMILIES` by `config.model_type` (for a diffusers model,
its class name: see `swarm.checkpoint.DiffusersConfig`)."""

from __future__ import annotations

from swarm.errors import ConfigurationError
from swarm.models.base import ModelFamily
from swarm.models.llama import LlamaFamily
from swarm.models.mixtral import MixtralFamily
from swarm.models.t5 import T5Family
from swarm.models.unet import UNetFamily

FAMILIES: dict[str, ModelFamily] = {
    "llama": LlamaFamily(),
    "mixtral": MixtralFamily(),
    "t5": T5Family(),
    "UNet2DConditionModel": UNetFamily(),
}


def family_for(config) -> ModelFamily:
    """The family that serves `config`, or a `ConfigurationError` listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(
            f"{architecture} ({name})" for name, family in FAMILIES.items() for architecture in family.architectures
        )
        raise ConfigurationError(f"model type {model_type!r} is not supported; swarm serves: {supported}")
    return FAMILIES[model_type]
