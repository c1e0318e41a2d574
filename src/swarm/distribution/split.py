"""Splitting a model folder into the published layout: one safetensors file per block, and its manifest.

    block-00000.safetensors ...          one per block, tensor names unchanged (beside the config: diffusers
                                          accepts no folder in an index's file names)
    client.safetensors                    the tensors only the client loads (embeddings, final norm, head, ...)
    shared.safetensors                    the tensors every server needs (T5's relative attention bias), if any
    model.safetensors.index.json          their weight map (`diffusion_pytorch_model...` for a diffusers model)
    config.json, tokenizer files, ...     copied as they are

For a diffusers pipeline, the served component's folder (`unet/`) is split so, and the other components (text
encoder, VAE, scheduler, tokenizer) are copied as the client's files. The result is still a normal checkpoint:
transformers, diffusers and swarm's servers load it as they load the original. Weights are read only from
safetensors; pickled weight files (`*.bin`, `*.pt`, ...) are left out, since a peer must never unpickle them.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from safetensors.torch import save_file
from tqdm.auto import tqdm

from swarm.checkpoint import WEIGHT_FILES, CheckpointIndex, load_model_config
from swarm.distribution.manifest import FileEntry, Manifest
from swarm.errors import ConfigurationError
from swarm.models import FAMILIES, family_for

logger = logging.getLogger(__name__)

PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".msgpack", ".h5")  # never published


def split_model(source: Path, destination: Path, name: str) -> Manifest:
    """Writes the published layout of the model at `source` into the empty folder `destination`."""
    config, weights_path = load_model_config(source, FAMILIES)
    family = family_for(config)
    config = family.prepare_config(config)
    component = weights_path.relative_to(source)
    checkpoint = CheckpointIndex(weights_path)
    groups = tensor_groups(family, config, list(checkpoint.file_of))
    destination.mkdir(parents=True, exist_ok=False)
    files: dict[str, FileEntry] = {}
    weight_map = {}
    total = checkpoint.nbytes(list(checkpoint.file_of))
    with tqdm(total=total, desc=f"Splitting {source.name}", unit="B", unit_scale=True, disable=None) as progress:
        for relative, (role, blocks, names) in groups.items():
            path = destination / component / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(checkpoint.load(names), path, metadata={"format": "pt"})
            files[(component / relative).as_posix()] = FileEntry(path.stat().st_size, role, blocks)
            weight_map.update(dict.fromkeys(names, relative.as_posix()))
            progress.update(checkpoint.nbytes(names))
    index_path = destination / component / index_name(weights_path)
    index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    files[(component / index_path.name).as_posix()] = FileEntry(index_path.stat().st_size, "small")
    for path, role in copied_files(source, component, checkpoint):
        target = destination / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        files[path.relative_to(source).as_posix()] = FileEntry(target.stat().st_size, role)
    manifest = Manifest(name, config.model_type, family.num_blocks(config), files)
    logger.info(f"Split {source} into {len(files)} files ({manifest.total_bytes / 2**20:.1f} MiB) in {destination}")
    return manifest


def tensor_groups(family, config, names: list[str]) -> dict[Path, tuple[str, tuple[int, ...], list[str]]]:
    """File within the served folder -> (role, blocks, tensor names) for every tensor of the checkpoint."""
    shared = set(family.shared_tensor_names(config, names))
    groups = {
        Path(f"block-{index:05d}.safetensors"): ("block", (index,), sorted(set(family.block_tensor_names(config, index, names)) - shared))
        for index in range(family.num_blocks(config))
    }
    groups[Path("client.safetensors")] = ("client", (), sorted(set(family.client_tensor_names(config, names)) - shared))
    if shared:
        groups[Path("shared.safetensors")] = ("shared", (), sorted(shared))
    placed = [name for _, _, group in groups.values() for name in group]
    if len(placed) != len(set(placed)) or set(placed) != set(names):
        twice = sorted({name for name in placed if placed.count(name) > 1})
        raise ConfigurationError(f"cannot split the checkpoint: tensors {twice[:5]} in two files, {sorted(set(names) - set(placed))[:5]} in none")
    return groups


def index_name(weights_path: Path) -> str:
    """The index file name the checkpoint's own loader looks for (transformers' or diffusers')."""
    for single, index in WEIGHT_FILES:
        if (weights_path / single).is_file() or (weights_path / index).is_file():
            return index
    raise ConfigurationError(f"{weights_path} has no safetensors weights")


def copied_files(source: Path, component: Path, checkpoint: CheckpointIndex) -> list[tuple[Path, str]]:
    """The model's other files and their roles: the served folder's own (config, ...) and the top level's are
    small; a pipeline's other components are the client's. Hidden files and pickled weights stay out."""
    served_weights = {path.resolve() for path in checkpoint.file_of.values()}
    served_weights |= {(source / component / index).resolve() for _, index in WEIGHT_FILES}
    copied = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts) or path.resolve() in served_weights:
            continue
        if path.suffix in PICKLED:
            logger.warning(f"Not publishing {relative}: pickled weights are never loaded from the network")
            continue
        in_served = component == Path(".") or relative.parts[0] == component.parts[0]
        copied.append((path, "small" if in_served or len(relative.parts) == 1 else "client"))
    return copied
