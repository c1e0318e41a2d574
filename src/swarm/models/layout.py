"""A causal LM's layout, read off its own class: where its layers are, how they are called, what they attend to.

`read_layout` builds the model on the meta device (`AutoModelForCausalLM.from_config`: no weights, real
non-persistent buffers such as rotary frequencies) and finds: the one `nn.ModuleList` holding all its layers
(`model.layers`, `transformer.h`, `gpt_neox.layers`, `model.decoder.layers`), the rotary embedding module of
that list's owner if it has one, the keywords its layers take, every layer's attention type as transformers'
caches see it, and how transformers renames checkpoint tensors when it loads them. It also sets the attention
implementation the class supports on the config (eager for gemma2's softcapping). What swarm cannot serve is
an `UnsupportedModelError` naming the model type and every reason.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import AutoModelForCausalLM
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from swarm.errors import UnsupportedModelError
from swarm.quantization import PrecisionRules

ATTENTION_TYPES = ("full_attention", "sliding_attention")  # the layer types a server makes masks for
CACHE_KEYWORDS = ("cache", "layer_past", "past_key_values")  # what layers of different ages call their cache
# the arguments a server gives a layer; a layer that takes any other one is not served, unless it is one that
# the model's forward leaves at its default (no cross-attention in a causal LM, no attention weights returned)
KNOWN_ARGUMENTS = {"hidden_states", "attention_mask", "position_embeddings", "position_ids", "use_cache", "alibi"}
LEFT_AT_DEFAULT = {"output_attentions", "encoder_hidden_states", "encoder_attention_mask"}


@dataclass(frozen=True)
class DecoderLayout:
    layers: str  # the nn.ModuleList of layers ("model.layers", "transformer.h", ...)
    rotary: str | None  # the rotary embedding module, None for learned or alibi positions
    rotary_per_layer_type: bool  # the rotary module takes a layer type (gemma3: one base per attention type)
    layer_types: tuple[str, ...]  # every layer's attention type, as transformers' caches see them
    parameters: frozenset[str]  # what a layer's forward takes
    cache_keyword: str  # the name it takes its cache by
    rename: Callable[[str], str]  # checkpoint tensor name -> the model's own, by transformers' loading rules
    precision: PrecisionRules  # how transformers holds its modules in lower precisions


def read_layout(config, computes_alibi: bool, converts_checkpoints: bool) -> DecoderLayout:
    """The layout of `config`'s causal LM. `computes_alibi`, `converts_checkpoints`: whether the family has an
    adapter for alibi biases, and a converter for checkpoints that transformers rewrites while loading."""
    model_type = getattr(config, "model_type", None)
    model = build_model(config)
    count = getattr(config, "num_hidden_layers", None)
    stacks = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module) == count]
    if len(stacks) != 1:
        raise UnsupportedModelError(model_type, f"swarm finds no single list of its {count} layers in {type(model).__name__}")
    layers, (owner_path, _, _) = model.get_submodule(stacks[0]), stacks[0].rpartition(".")
    if len({type(layer) for layer in layers}) != 1:
        raise UnsupportedModelError(model_type, "its layers are of several classes")
    conversions = get_model_conversion_mapping(model)
    signature = inspect.signature(type(layers[0]).forward)
    parameters = frozenset(signature.parameters) - {"self"}
    named = {
        name for name, parameter in signature.parameters.items() if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    } - {"self", *CACHE_KEYWORDS}
    unknown = named - KNOWN_ARGUMENTS - (set() if getattr(config, "add_cross_attention", False) else LEFT_AT_DEFAULT)
    cache_keyword = next((name for name in CACHE_KEYWORDS if name in parameters), None)
    rotary = getattr(model.get_submodule(owner_path), "rotary_emb", None)
    layer_types = tuple(get_layer_types_and_kwargs(config)[0])
    problems = [
        f"its layers take {sorted(unknown)} from its forward" if unknown else None,
        "its layers take no cache" if cache_keyword is None else None,
        "its layers take rotary embeddings but it has no rotary_emb module"
        if "position_embeddings" in parameters and rotary is None
        else None,
        "its layers take alibi biases that swarm cannot compute for it" if "alibi" in parameters and not computes_alibi else None,
        "transformers converts its checkpoints when it loads them (fused experts)"
        if not converts_checkpoints and any(isinstance(rule, WeightConverter) for rule in conversions)
        else None,
        *(f"layers of type {kind!r}" for kind in sorted(set(layer_types) - set(ATTENTION_TYPES))),
    ]
    if any(problems):
        raise UnsupportedModelError(model_type, "swarm cannot serve it: " + "; ".join(filter(None, problems)))
    config._attn_implementation = model.config._attn_implementation  # what the class supports (eager for gemma2)
    return DecoderLayout(
        layers=stacks[0],
        rotary=f"{owner_path}.rotary_emb" if rotary is not None else None,
        rotary_per_layer_type=rotary is not None and "layer_type" in inspect.signature(type(rotary).forward).parameters,
        layer_types=layer_types,
        parameters=parameters,
        cache_keyword=cache_keyword,
        rename=checkpoint_renamer(model, [rule for rule in conversions if isinstance(rule, WeightRenaming)]),
        precision=PrecisionRules.of(model),
    )


def converted_patterns(model: nn.Module) -> tuple[str, ...]:
    """The checkpoint names (regular expressions) whose tensors transformers rewrites while loading `model`'s
    class (fused experts, a fused SwiGLU projection split in two, ...)."""
    rules = [rule for rule in get_model_conversion_mapping(model) if isinstance(rule, WeightConverter)]
    return tuple(pattern for rule in rules for pattern in rule.source_patterns)


def tensors_under(
    model_type: str | None, prefix: str, checkpoint_names, rename: Callable[[str], str], converted: tuple[str, ...]
) -> dict[str, str]:
    """Checkpoint name -> name below `prefix` (a block's path plus a dot), for the tensors of the module at `prefix`
    once transformers' renaming rules apply; `UnsupportedModelError` if transformers would rewrite (`converted`) any
    tensor of the checkpoint while loading it, which swarm does not."""
    checkpoint_names = list(checkpoint_names)
    rewritten = sorted({name for name in checkpoint_names for pattern in converted if re.search(pattern, name)})
    if rewritten:
        raise UnsupportedModelError(model_type, f"transformers rewrites its checkpoint's {rewritten[:3]} while loading, which swarm does not")
    return {name: renamed[len(prefix) :] for name in checkpoint_names if (renamed := rename(name)).startswith(prefix)}


def loading_renamer(model: nn.Module) -> Callable[[str], str]:
    """`checkpoint_renamer` with transformers' own renaming rules for `model`'s class."""
    renamings = [rule for rule in get_model_conversion_mapping(model) if isinstance(rule, WeightRenaming)]
    return checkpoint_renamer(model, renamings)


def build_model(config) -> nn.Module:
    """`config`'s causal LM on the meta device (its non-persistent buffers, such as rotary frequencies, are real)."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config)
    except ValueError as error:
        raise UnsupportedModelError(getattr(config, "model_type", None), f"transformers has no causal LM for it ({error})") from None


def checkpoint_renamer(model: nn.Module, renamings: list[WeightRenaming]) -> Callable[[str], str]:
    """Checkpoint name -> `model`'s parameter name, as transformers renames them when it loads a checkpoint: its
    renaming rules (`embed_out` -> `lm_head` in GPT-NeoX, legacy `gamma`/`beta`, ...), and the base model's prefix
    added or dropped (`h.0.*` -> `transformer.h.0.*` in GPT-2's own checkpoints)."""
    names = dict.fromkeys(model.state_dict(), True)

    @functools.cache
    def rename(name: str) -> str:
        return rename_source_key(name, renamings, [], model.base_model_prefix, names)[0]

    return rename
