"""Reading a Hugging Face checkpoint piece by piece: only the tensors a peer needs, only from their shards.

A checkpoint is a local directory in Hugging Face layout (`config.json` plus `model.safetensors` or
sharded `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`), or a repo id that
is already in the local Hugging Face cache. Weights load from safetensors only.

Diffusers layouts work too: a model folder (`config.json` with `_class_name`, weights in
`diffusion_pytorch_model.safetensors`, possibly sharded with its `.index.json`), or a pipeline folder
(`model_index.json` naming one folder per component), whose served component is the one a family knows.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Collection

import torch
from safetensors import safe_open

from swarm.errors import ConfigurationError

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_FILES = (  # (single file, index of shards), in the order they are looked for
    (SINGLE_FILE, INDEX_FILE),
    ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
)
CONFIG_FILE = "config.json"
PIPELINE_FILE = "model_index.json"  # a diffusers pipeline: one folder per component


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """Returns the local directory of a model: the path itself, or a cached snapshot of a repo id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "model_index.json").is_file():
            raise ConfigurationError(f"{path} is a directory but not a model: it has no config.json")
        return path
    if path.exists():
        raise ConfigurationError(f"{path} is a file, not a model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except Exception as error:
        raise ConfigurationError(
            f"{name_or_path!r} is neither a local model directory nor a repo id in the local Hugging Face cache "
            f"({type(error).__name__})"
        ) from None


def local_model_path(name_or_path: str | os.PathLike) -> Path | None:
    """The local directory of a model (as `resolve_model_path`), or None when `name_or_path` is neither a path on
    this disk nor a repo id in the local Hugging Face cache: then it may name a model published in the swarm."""
    if Path(name_or_path).expanduser().exists():
        return resolve_model_path(name_or_path)
    try:
        return resolve_model_path(name_or_path)
    except ConfigurationError:
        return None


def model_name_of(name_or_path: str | os.PathLike) -> str:
    """The name a model goes by in the swarm: a repo id as is, a local directory by its base name, and a
    component folder of a diffusers pipeline by the pipeline's name (so `sd/unet` and `sd` serve one model)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path.resolve()
        return path.parent.name if (path.parent / PIPELINE_FILE).is_file() else path.name
    return str(name_or_path)


class DiffusersConfig:
    """A diffusers model's `config.json`: its fields as attributes, and its class name as `model_type`
    (`UNet2DConditionModel`), which is how `swarm.models.FAMILIES` knows it."""

    def __init__(self, values: dict[str, Any]):
        self.values = dict(values)  # every field, as `from_config` of the model's class takes them
        self.model_type = values["_class_name"]

    def __getattr__(self, name: str):
        if name != "values" and name in self.__dict__.get("values", {}):
            return self.values[name]
        raise AttributeError(f"{type(self).__name__} of {self.__dict__.get('model_type')} has no field {name!r}")

    def __repr__(self) -> str:
        return f"DiffusersConfig({self.values!r})"


def load_model_config(path: Path, served_types: Collection[str]) -> tuple[Any, Path]:
    """The configuration of the model at `path` and the folder that holds its weights.

    `path` is a transformers model (its config's `model_type` picks the family), a diffusers model (its
    `_class_name` does), or a diffusers pipeline, whose served component is the one whose class is among
    `served_types` (the UNet of Stable Diffusion; the text encoder and VAE stay with the client).
    """
    if (path / PIPELINE_FILE).is_file() and not (path / CONFIG_FILE).is_file():
        components = json.loads((path / PIPELINE_FILE).read_text())
        served = [
            name
            for name, value in components.items()
            if isinstance(value, list) and len(value) == 2 and value[1] in served_types and (path / name).is_dir()
        ]
        if len(served) != 1:
            listed = {name: value[1] for name, value in components.items() if isinstance(value, list) and len(value) == 2}
            raise ConfigurationError(
                f"pipeline {path} must have exactly one component that swarm serves ({', '.join(sorted(served_types))}); "
                f"its components are {listed}"
            )
        path = path / served[0]
    try:
        values = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        values = None  # transformers says what is wrong below
    if isinstance(values, dict) and "_class_name" in values:
        return DiffusersConfig(values), path
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path), path
    except (OSError, ValueError, KeyError) as error:
        raise ConfigurationError(f"{path} is not a model that transformers can read: {error}") from None


class CheckpointIndex:
    """Knows which safetensors file holds each tensor of a checkpoint directory."""

    def __init__(self, directory: Path):
        self.directory = directory
        for single_file, index_file in WEIGHT_FILES:
            index_path, single_path = directory / index_file, directory / single_file
            if index_path.is_file():
                weight_map = json.loads(index_path.read_text())["weight_map"]
                self.file_of = {name: directory / file for name, file in weight_map.items()}
                return
            if single_path.is_file():
                with safe_open(single_path, framework="pt") as reader:
                    self.file_of = {name: single_path for name in reader.keys()}
                return
        raise ConfigurationError(
            f"{directory} has no {SINGLE_FILE} nor {INDEX_FILE}: swarm loads weights from safetensors only"
        )

    def names(self, predicate: Callable[[str], bool]) -> list[str]:
        return [name for name in self.file_of if predicate(name)]

    def nbytes(self, names: list[str], dtype: torch.dtype | None = None) -> int:
        """Bytes the given tensors take in memory (in `dtype` for floating-point ones), without reading them."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.file_of[name]].append(name)
        total = 0
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as reader:
                for name in file_names:
                    piece = reader.get_slice(name)
                    stored = SAFETENSORS_DTYPES[piece.get_dtype()]
                    itemsize = (dtype if dtype is not None and stored.is_floating_point else stored).itemsize
                    total += math.prod(piece.get_shape()) * itemsize
        return total

    def load(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Reads the given tensors, opening only the files that hold them."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.file_of[name]].append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as reader:
                for name in file_names:
                    tensor = reader.get_tensor(name)
                    tensors[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return tensors

    def load_prefix(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Reads every tensor whose name starts with `prefix`, keyed by the rest of the name."""
        names = self.names(lambda name: name.startswith(prefix))
        return {name[len(prefix) :]: tensor for name, tensor in self.load(names, dtype).items()}
