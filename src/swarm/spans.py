"""Block spans. A span is half-open everywhere in `swarm`: `BlockSpan(10, 20)` holds blocks 10..19.

The same convention holds in the DHT records, the CLI (`--blocks 10:20`), log lines and code.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarm.errors import ConfigurationError


@dataclass(frozen=True, order=True)
class BlockSpan:
    start: int  # first block index, inclusive
    end: int  # one past the last block index

    def __post_init__(self):
        if self.start < 0 or self.end <= self.start:
            raise ConfigurationError(f"a span needs 0 <= start < end, got [{self.start}, {self.end})")

    @classmethod
    def parse(cls, text: str) -> "BlockSpan":
        """Parses `START:END` (half-open), as given to `--blocks`."""
        start, sep, end = text.partition(":")
        try:
            if not sep:
                raise ValueError
            return cls(int(start), int(end))
        except ValueError:
            raise ConfigurationError(f"expected a span START:END such as 0:16, got {text!r}") from None

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __contains__(self, block: int) -> bool:
        return self.start <= block < self.end

    def contains_span(self, other: "BlockSpan") -> bool:
        return self.start <= other.start and other.end <= self.end

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"
