"""A server's own speed: measured once per model, dtype and device, then cached on disk."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from swarm.models.base import LoadedSpan, ModelFamily

logger = logging.getLogger(__name__)


def cache_path() -> Path:
    root = Path(os.environ.get("SWARM_CACHE_DIR") or Path.home() / ".cache" / "swarm").expanduser()
    return root / "throughput.json"


def seconds_per_block(family: ModelFamily, loaded: LoadedSpan, model_name: str, repeats: int = 3) -> float:
    """Seconds one position takes through one block: cached, or measured on the loaded span."""
    key = f"{model_name}|{loaded.dtype}|{loaded.device}"
    path = cache_path()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached.get(key), (int, float)) and cached[key] > 0:
        return float(cached[key])
    measured = measure(family, loaded, repeats) / len(loaded.span)
    cached[key] = measured
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=1))
    except OSError as error:
        logger.warning(f"Could not cache the measured throughput in {path}: {error}")
    return measured


def measure(family: ModelFamily, loaded: LoadedSpan, repeats: int) -> float:
    """Seconds for one position of batch 1 through the whole span, best of `repeats` after a warm-up."""
    inputs = family.example_inputs(loaded)
    best = math.inf
    with torch.inference_mode():
        family.forward(loaded, loaded.span, inputs, None, None)
        for _ in range(repeats):
            started = time.perf_counter()
            family.forward(loaded, loaded.span, inputs, None, None)
            best = min(best, time.perf_counter() - started)
    return max(best, 1e-6)
