"""What each file of a published model holds, so that a peer fetches only the files it needs.

A published model is a folder (the torrent's root, `model/`) with one safetensors file per block, one with the
tensors the client loads, one with the tensors every server of a stage needs (T5's relative attention bias),
the small files (config, tokenizer, generation config, a diffusers pipeline's index and scheduler), and the
safetensors index that makes it a normal checkpoint. Its manifest lists every file with its size and role:

    block   the tensors of the blocks it names           fetched by the servers of those blocks
    shared  tensors every server needs                   fetched by every server
    client  tensors (or a pipeline's components) that    fetched by clients
            only the client loads
    small   configuration, tokenizer, index              fetched by everyone

The manifest travels in the publisher's signed DHT announcement; a peer checks it (`Manifest.from_dict`) and
then checks that the torrent's files are exactly the manifest's (`check_files`) before it downloads a byte.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from swarm.errors import ConfigurationError
from swarm.spans import BlockSpan

ROLES = ("block", "shared", "client", "small")
ROOT = "model"  # the torrent's root folder
MAX_FILES = 100_000
MAX_TOTAL_BYTES = 1 << 44  # 16 TiB: a manifest claiming more is refused


class ManifestError(ConfigurationError):
    """A manifest, or a torrent against its manifest, that a peer refuses: unsafe paths, lying sizes, ..."""


@dataclass(frozen=True)
class FileEntry:
    size: int  # bytes
    role: str  # one of ROLES
    blocks: tuple[int, ...] = ()  # for role "block": the blocks whose tensors it holds


@dataclass(frozen=True)
class Manifest:
    name: str  # the name it is published under
    model_type: str  # `config.model_type` (a diffusers model's class name)
    num_blocks: int
    files: dict[str, FileEntry]  # path within the model folder -> entry

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def files_for_blocks(self, span: BlockSpan) -> list[str]:
        """What a server of blocks `span` needs: their block files, the shared and the small files."""
        return sorted(
            path
            for path, entry in self.files.items()
            if entry.role in ("shared", "small") or any(block in span for block in entry.blocks)
        )

    def client_files(self) -> list[str]:
        return sorted(path for path, entry in self.files.items() if entry.role in ("client", "small"))

    def block_files(self, path_exists) -> dict[int, bool]:
        """For each block, whether its files are all present (`path_exists(path)`)."""
        present = dict.fromkeys(range(self.num_blocks), True)
        for path, entry in self.files.items():
            for block in entry.blocks:
                present[block] = present[block] and path_exists(path)
        return present

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "model_type": self.model_type,
            "num_blocks": self.num_blocks,
            "files": {
                path: {"size": entry.size, "role": entry.role, **({"blocks": list(entry.blocks)} if entry.blocks else {})}
                for path, entry in sorted(self.files.items())
            },
        }

    @classmethod
    def from_dict(cls, data) -> "Manifest":
        """A manifest from untrusted data: every field checked, or `ManifestError` naming what is wrong."""
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise ManifestError("a manifest must be a mapping with 'files'")
        name, model_type, num_blocks = data.get("name"), data.get("model_type"), data.get("num_blocks")
        if not (isinstance(name, str) and isinstance(model_type, str) and isinstance(num_blocks, int) and num_blocks > 0):
            raise ManifestError("a manifest needs a name, a model_type and a positive num_blocks")
        if not 0 < len(data["files"]) <= MAX_FILES:
            raise ManifestError(f"a manifest lists 1 to {MAX_FILES} files, got {len(data['files'])}")
        files = {check_path(path): check_entry(path, entry, num_blocks) for path, entry in data["files"].items()}
        manifest = cls(name, model_type, num_blocks, files)
        if manifest.total_bytes > MAX_TOTAL_BYTES:
            raise ManifestError(f"the manifest claims {manifest.total_bytes} bytes, more than {MAX_TOTAL_BYTES}")
        missing = set(range(num_blocks)) - {block for entry in files.values() for block in entry.blocks}
        if missing:
            raise ManifestError(f"no file holds blocks {sorted(missing)}")
        return manifest

    def check_files(self, torrent_files: dict[str, int]):
        """Refuses a torrent whose files (path within the model folder -> size) are not exactly the manifest's."""
        expected = {path: entry.size for path, entry in self.files.items()}
        if torrent_files != expected:
            differences = sorted(set(torrent_files.items()) ^ set(expected.items()))[:5]
            raise ManifestError(f"the torrent's files do not match the manifest of {self.name!r}: {differences}")


def check_path(path) -> str:
    """A relative POSIX path within the model folder, or `ManifestError`."""
    if not isinstance(path, str) or not path or len(path) > 1024 or "\\" in path or "\0" in path:
        raise ManifestError(f"file path {path!r} is not a relative POSIX path")
    parts = path.split("/")
    if path.startswith("/") or posixpath.normpath(path) != path or any(part in ("", ".", "..") for part in parts):
        raise ManifestError(f"file path {path!r} would leave the model folder")
    return path


def check_entry(path: str, entry, num_blocks: int) -> FileEntry:
    if not isinstance(entry, dict):
        raise ManifestError(f"entry of {path!r} must be a mapping")
    size, role, blocks = entry.get("size"), entry.get("role"), entry.get("blocks", [])
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_TOTAL_BYTES:
        raise ManifestError(f"size of {path!r} must be a byte count, got {size!r}")
    if role not in ROLES:
        raise ManifestError(f"role of {path!r} must be one of {ROLES}, got {role!r}")
    if not isinstance(blocks, list) or not all(isinstance(block, int) and 0 <= block < num_blocks for block in blocks):
        raise ManifestError(f"blocks of {path!r} must be block numbers below {num_blocks}, got {blocks!r}")
    if (role == "block") != bool(blocks):
        raise ManifestError(f"{path!r}: a block file names its blocks, and only a block file does")
    return FileEntry(size, role, tuple(blocks))
