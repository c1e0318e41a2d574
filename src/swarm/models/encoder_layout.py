"""An encoder's layout, read off the class its checkpoint names: where its layers are, what they take and return,
which model gives them their mask, and which of their outputs the model reads.

`read_encoder_layout` builds that class on the meta device (`AutoModel`'s when the checkpoint names none) and
finds the one `nn.ModuleList` of the layer class transformers records hidden states from. What swarm cannot
serve is an `UnsupportedModelError` naming the model type and the reason.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.backbone_utils import BackboneMixin
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from swarm.errors import UnsupportedModelError
from swarm.models.layout import converted_patterns, loading_renamer
from swarm.quantization import PrecisionRules

# what a layer may take: the hidden states and the mask, and what an encoder's forward leaves at its default
KNOWN_ARGUMENTS = {"hidden_states", "attention_mask"}
LEFT_AT_DEFAULT = {
    "encoder_hidden_states",
    "encoder_attention_mask",
    "output_attentions",
    "cache",
    "past_key_values",
    "head_mask",
}
CAUSAL_LM_CLASSES = {
    name
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    for name in ([names] if isinstance(names, str) else names)
}

# reads_outputs(config) -> the layers whose outputs the model's head reads (indices in its list of layers), or None
ReadsOutputs = Callable[[object], list[int] | None]


@dataclass(frozen=True)
class EncoderLayout:
    layers: str  # the nn.ModuleList of layers in it ("encoder.layer", "bert.encoder.layer", "backbone.encoder.layer")
    owner: str  # the model whose call gives the attention mask ("" for the model itself)
    count: int
    hidden_size: int
    takes_mask: bool  # whether its layers take an attention mask (a ViT's in DPT take the hidden states alone)
    returns: int  # what a layer returns: 0, the hidden states; n, a tuple of n (FNet, MegatronBERT)
    config: object  # the configuration of the sub-model that holds them (a depth model's backbone has its own)
    reads_outputs: tuple[int, ...] | None  # the layers whose outputs the model's own code reads; None: any
    rename: Callable[[str], str]  # checkpoint tensor name -> the model's own, by transformers' loading rules
    converted: tuple[str, ...]  # checkpoint names that transformers rewrites while loading (swarm does not)
    precision: PrecisionRules  # how transformers holds its modules in lower precisions


def checkpoint_class(config) -> type | None:
    """The transformers class the checkpoint names, if it has one."""
    names = getattr(config, "architectures", None) or []
    return getattr(transformers, names[0], None) if names else None


def build_model(config) -> nn.Module:
    """The checkpoint's class (else `AutoModel`'s) for `config`, on the meta device."""
    from accelerate import init_empty_weights

    model_class = checkpoint_class(config)
    try:
        with init_empty_weights():
            return AutoModel.from_config(config) if model_class is None else model_class(config)
    except ValueError as error:
        raise UnsupportedModelError(
            getattr(config, "model_type", None), f"transformers has no model for it ({error})"
        ) from None


def recorded_layer_classes(model: nn.Module) -> set[type]:
    """The classes whose outputs transformers records as hidden states, in `model` and its sub-models."""
    classes = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            specs = (getattr(type(module), "_can_record_outputs", None) or {}).get("hidden_states")
            for spec in specs if isinstance(specs, list) else [specs]:
                target = getattr(spec, "target_class", spec)
                if isinstance(target, type):
                    classes.add(target)
    return classes


@functools.cache
def _named_parameters(layer_class: type) -> frozenset[str]:
    signature = inspect.signature(layer_class.forward)
    return frozenset(
        name
        for name, parameter in signature.parameters.items()
        if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ) - {"self"}


def _returns(layer: nn.Module, hidden_size: int, model_type: str | None) -> int:
    """How many values `layer` returns (0: a tensor alone), found by running it on the meta device."""
    mask = {"attention_mask": None} if "attention_mask" in _named_parameters(type(layer)) else {}
    try:
        with torch.no_grad():
            output = layer(torch.empty(1, 2, hidden_size, device="meta"), **mask)
    except Exception as error:
        raise UnsupportedModelError(model_type, f"swarm could not run its layer on the meta device to see what it returns ({error})") from None
    return len(output) if isinstance(output, tuple) else 0


def read_encoder_layout(config, reads_outputs: ReadsOutputs | None = None) -> EncoderLayout:
    """The layout of `config`'s encoder, or `UnsupportedModelError` naming why swarm cannot serve it."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        raise UnsupportedModelError(model_type, "it is not an encoder-only model, and swarm has no family for it")
    model_class = checkpoint_class(config)
    if model_class is not None and model_class.__name__ in CAUSAL_LM_CLASSES:
        raise UnsupportedModelError(model_type, f"{model_class.__name__} is a causal LM")
    model = build_model(config)
    recorded = tuple(recorded_layer_classes(model))
    lists = {
        name: module for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module) > 0
    }
    if recorded:
        stacks = [name for name, module in lists.items() if all(isinstance(layer, recorded) for layer in module)]
    else:
        stacks = [name for name, module in lists.items() if len(module) == getattr(config, "num_hidden_layers", None)]
    if len(stacks) != 1:
        raise UnsupportedModelError(model_type, f"swarm finds no single list of layers in {type(model).__name__}")
    layers = model.get_submodule(stacks[0])
    if len({type(layer) for layer in layers}) != 1:
        raise UnsupportedModelError(model_type, "its layers are of several classes")
    unknown = _named_parameters(type(layers[0])) - KNOWN_ARGUMENTS - LEFT_AT_DEFAULT
    if unknown:
        raise UnsupportedModelError(
            model_type, f"swarm cannot serve it: its layers take {sorted(unknown)} from its forward"
        )
    parts = stacks[0].split(".")
    paths = [".".join(parts[:end]) for end in range(len(parts))]
    models = [path for path in paths if isinstance(model.get_submodule(path), PreTrainedModel)]
    # the outermost model whose call takes an attention mask gives it as its user did (its forward makes the 4-D one)
    owner = next((path for path in models if "attention_mask" in _named_parameters(type(model.get_submodule(path)))), models[-1])
    layers_model = model.get_submodule(models[-1])  # the innermost: its config describes the layers
    count = getattr(layers_model.config, "num_hidden_layers", len(layers))
    if count != len(layers):  # ALBERT runs one group of layers num_hidden_layers times
        raise UnsupportedModelError(model_type, f"its forward runs {count} layers from a list of {len(layers)}")
    read = reads_outputs(config) if reads_outputs is not None else None
    backbones = [model.get_submodule(path) for path in models if isinstance(model.get_submodule(path), BackboneMixin)]
    if read is None and backbones:  # a backbone's stage 0 is the embeddings' output, stage i the output of layer i - 1
        stages = len(backbones[-1].stage_names)
        read = [index % stages - 1 for index in backbones[-1].out_indices if index % stages]
    config._attn_implementation = model.config._attn_implementation
    return EncoderLayout(
        layers=stacks[0],
        owner=owner,
        count=len(layers),
        hidden_size=layers_model.config.hidden_size,
        takes_mask="attention_mask" in _named_parameters(type(layers[0])),
        returns=_returns(layers[0], layers_model.config.hidden_size, model_type),
        config=layers_model.config,
        reads_outputs=tuple(read) if read is not None else None,
        rename=loading_renamer(model),
        converted=converted_patterns(model),
        precision=PrecisionRules.of(model),
    )
