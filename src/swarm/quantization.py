"""Quantized blocks: a server may hold its blocks' linear layers in 8 bits (LLM.int8) or 4 bits (NF4).

bitsandbytes does the quantization and the matrix products, on the CPU as on a GPU. The linear layers inside a
server's blocks are replaced by their bitsandbytes counterparts (`Linear8bitLt`, `Linear4bit`) holding the
quantized weights; everything else (norms, embeddings of positions, fused expert tensors) keeps the server's
dtype. The settings are transformers' defaults (`BitsAndBytesConfig(load_in_8bit=True)`, `load_in_4bit=True`
with `bnb_4bit_quant_type="nf4"`), and so are the layers it picks (`PrecisionRules`: plain `nn.Linear` and
`Conv1D` only, none its model class keeps in float32), so a block computes what the same layer of a model that
transformers quantized computes. A diffusers model's blocks have every `nn.Linear` quantized, as diffusers does.
A server announces what it runs (`ServerRecord.dtype`, `ServerRecord.quant_type`), and a client may require a
minimum precision (`ClientConfig.min_precision`): bits per weight, float32 > float16 = bfloat16 > int8 > nf4.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module

from swarm.errors import ConfigurationError

logger = logging.getLogger(__name__)

QUANT_TYPES = ("none", "int8", "nf4")
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold: input features above it are multiplied in the compute dtype
PACKED_ROWS = 32  # output features per block of bitsandbytes' packed nf4 CPU kernel (`block_n`)
PRECISION_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8, "nf4": 4}


def precision_of(dtype: str, quant_type: str) -> str:
    """What a server's weights are held in: its dtype, unless they are quantized."""
    return dtype if quant_type == "none" else quant_type


def rows_independent(quant_type: str) -> bool:
    """Whether layers quantized so compute each row of a batch as they would compute it alone. LLM.int8 does not:
    it multiplies in the compute dtype every input feature that passes its outlier threshold in any row of the
    batch, so in a batch one session's outliers would change the others' results (by up to 0.3 in a tiny Llama's
    hidden states)."""
    return quant_type != "int8"


@dataclass(frozen=True)
class PrecisionRules:
    """How transformers holds a model's modules when it loads the model in a lower precision, as patterns of
    module paths in the model (its class's `_keep_in_fp32_modules` and `_keep_in_fp32_modules_strict`, "wo" in
    T5). `BitsAndBytesConfig` quantizes the layers whose class is exactly `nn.Linear` (or `Conv1D`) except those
    `unquantized` matches; loading in float16 keeps what `float32` or `float32_strict` matches in float32, and
    loading in bfloat16 what `float32_strict` matches."""

    unquantized: tuple[str, ...] = ()
    float32: tuple[str, ...] = ()
    float32_strict: tuple[str, ...] = ()

    @classmethod
    def of(cls, model: nn.Module) -> "PrecisionRules":
        """The rules of a transformers model (built on the meta device will do)."""
        float32 = tuple(sorted(getattr(model, "_keep_in_fp32_modules", None) or ()))
        # with no skip list of its own, BitsAndBytesConfig also leaves out tied, output and last layers
        unquantized = tuple(sorted({*get_keys_to_not_convert(model), *float32}))
        return cls(unquantized, float32, tuple(sorted(getattr(model, "_keep_in_fp32_modules_strict", None) or ())))

    def quantizes(self, path: str, module: nn.Module) -> bool:
        """Whether the module at `path` in the model is a layer transformers would quantize."""
        linear = type(module) is nn.Linear or isinstance(module, Conv1D)
        return linear and should_convert_module(path, list(self.unquantized))

    def keeps_in_float32(self, name: str, dtype: torch.dtype) -> bool:
        """Whether transformers loads tensor `name` of the model (its state-dict name) in float32 when it loads the
        model in `dtype`."""
        patterns = self.float32 if dtype == torch.float16 else ()
        patterns += self.float32_strict if dtype in (torch.float16, torch.bfloat16) else ()
        return any(re.search(pattern.replace("*", ".*"), name) for pattern in patterns)


def quantize_linears(
    module: nn.Module, quant_type: str, dtype: torch.dtype, device, rules: PrecisionRules | None = None, path: str = ""
) -> int:
    """Replaces the linear layers inside `module` (on `device`, in `dtype`) by their bitsandbytes counterparts with
    quantized weights, computing in `dtype`; returns how many it replaced. With `rules` (`module` being at `path`
    in its model), those transformers would quantize; without, every `nn.Linear` and `Conv1D`."""
    if quant_type == "none":
        return 0
    if quant_type not in QUANT_TYPES:
        raise ConfigurationError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigurationError(f"--quant-type {quant_type} needs bitsandbytes: pip install 'swarm[quantization]'") from None
    replaced = _replace_linears(bnb, module, quant_type, dtype, device, rules, f"{path}." if path else "")
    _own_unquantized_tensors(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    return replaced


def return_freed_memory():
    """Hands the memory that quantizing freed back to the operating system. Quantizing a layer allocates and
    frees copies of its weights, and glibc's allocator keeps what was freed for later (measured on SmolLM2's 30
    blocks in int8: 339 MiB held after loading, 152 MiB after this; the weights take 101 MiB)."""
    library = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(library).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc: its allocator returns memory its own way
        logger.debug("No malloc_trim here; freed memory stays with the allocator")
        return
    trim(0)


def _replace_linears(bnb, module: nn.Module, quant_type: str, dtype: torch.dtype, device, rules, prefix: str) -> int:
    replaced = 0
    for name, child in list(module.named_children()):
        if (parts := _linear_parts(child)) is None:
            replaced += _replace_linears(bnb, child, quant_type, dtype, device, rules, f"{prefix}{name}.")
        elif rules is None or rules.quantizes(prefix + name, child):
            # in the mode of the layer it replaces: bitsandbytes computes otherwise in training mode
            setattr(module, name, _quantized(bnb, *parts, quant_type, dtype, device).train(child.training))
            replaced += 1
    return replaced


def _own_unquantized_tensors(module: nn.Module, quantized: tuple[type, ...]):
    """Copies the tensors that quantization leaves as they are (norms, ...) out of whatever memory they share. A
    server's weights are views of its checkpoint file mapped into memory; one view left keeps the whole mapping,
    whose pages the quantized weights replaced, counted in the server's memory."""
    for child in module.modules():
        if isinstance(child, quantized):
            continue
        for parameter in child.parameters(recurse=False):
            parameter.data = parameter.data.clone()
        for name, buffer in child.named_buffers(recurse=False):
            child.register_buffer(name, buffer.clone(), persistent=name not in child._non_persistent_buffers_set)


def _linear_parts(module: nn.Module) -> tuple[int, int, torch.Tensor, torch.Tensor | None] | None:
    """(input features, output features, weight as `nn.Linear` holds it, bias) of a linear layer: an `nn.Linear`, or
    a `Conv1D`, which holds its weight transposed; None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.weight.data, module.bias
    if isinstance(module, Conv1D):
        return module.nx, module.nf, module.weight.data.t(), module.bias
    return None


def _quantized(bnb, inputs: int, outputs: int, weight: torch.Tensor, bias: torch.Tensor | None, quant_type: str,
               dtype: torch.dtype, device) -> nn.Module:
    weight = weight.to(dtype).contiguous()
    if quant_type == "int8":
        quantized = bnb.nn.Linear8bitLt(
            inputs, outputs, bias=bias is not None, has_fp16_weights=False, threshold=INT8_THRESHOLD
        )
        quantized.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        quantized = bnb.nn.Linear4bit(
            inputs, outputs, bias=bias is not None, compute_dtype=dtype, compress_statistics=False, quant_type="nf4"
        )
        quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=False, quant_type="nf4")
        # bitsandbytes' packed CPU kernel (its eval-mode path where the CPU has AVX512-BF16) takes whole blocks of
        # input features and of PACKED_ROWS output features only, and fails on any other layer: that one multiplies
        # as in training mode
        whole = inputs % quantized.weight.blocksize == 0 and outputs % PACKED_ROWS == 0
        quantized.support_avx512bf16_for_cpu &= whole
    if bias is not None:
        quantized.bias = nn.Parameter(bias.data.to(dtype, copy=True), requires_grad=False)
    return quantized.to(device)  # bitsandbytes quantizes the weights as they move to the device
