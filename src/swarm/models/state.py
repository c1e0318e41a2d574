"""What a session keeps on a server between steps: one object for every family.

A session's state holds the attention caches of its blocks (a transformers `Cache`), how many positions it has
processed, its batch size, the attention mask of every position so far, and the tensors it keeps from the step
that sent them (an encoder's output for a decoder, the prompt embeddings for a UNet). Beam search reorders all of
them at once (`reorder`), `crop` drops the positions past a length (draft tokens that assisted decoding did not
accept), and `nbytes` says how much memory the session holds.

A sliding-window layer (Mistral, Qwen2, Gemma 2 and 3, Phi-3, ...) keeps only the last positions of its window, so
it could not take back a step past it. Its cache records a step's positions whole (transformers'
`activate_past_recording`) until the next step begins (`trim_windows`), so that a `crop` sent with the next step can
still drop the last step's positions, as assisted decoding does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from swarm.models.checks import require


@dataclass
class SequenceState:
    cache: object | None = None  # the blocks' attention caches (a transformers Cache), None for a family without one
    length: int = 0  # positions processed so far
    batch_size: int | None = None  # rows, fixed by the first step
    attention_mask: torch.Tensor | None = None  # (batch, length): every position's mask so far; None while all ones
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors kept from the step that sent them

    def __post_init__(self):
        for layer in _sliding_layers(self.cache):
            layer.activate_past_recording()

    def check_step(self, hypo_ids: torch.Tensor | None, batch: int, tokens: int, max_length: int):
        """Raises `BadRequestError` unless a step of `tokens` new positions for `batch` rows fits this session."""
        require(
            self.batch_size in (None, batch), f"this session holds a batch of {self.batch_size}, the step sends {batch}"
        )
        require(
            self.length + tokens <= max_length,
            f"step would reach {self.length + tokens} positions, past the session's max_length {max_length}",
        )
        if hypo_ids is not None:
            require(
                hypo_ids.dtype == torch.int64
                and tuple(hypo_ids.shape) == (batch,)
                and bool(((hypo_ids >= 0) & (hypo_ids < (self.batch_size or 0))).all()),
                f"hypo_ids must be int64 of shape ({batch},) indexing the session's batch of {self.batch_size}",
            )

    def reorder(self, hypo_ids: torch.Tensor):
        """Keeps, for each row, the history of row `hypo_ids[row]` (beam search keeps the beams it continues)."""
        if self.cache is not None:
            self.cache.reorder_cache(hypo_ids)
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[hypo_ids.to(self.attention_mask.device)]
        self.kept = {name: tensor[hypo_ids.to(tensor.device)] for name, tensor in self.kept.items()}

    def crop(self, length: int):
        """Forgets every position from `length` on, as if the steps had stopped there."""
        require(0 <= length <= self.length, f"crop must be between 0 and the session's {self.length} positions, got {length}")
        if length == self.length:
            return
        cache, dropped = self.cache, self.length - length
        require(cache is not None and getattr(cache, "is_croppable", False),
                "this model's session cache cannot drop positions (no assisted decoding for it)")  # fmt: skip
        for layer in _sliding_layers(cache):
            if layer.is_initialized and layer.keys.shape[-2] < self.length:  # it has forgotten its first positions
                recorded = layer.keys.shape[-2] - (layer.sliding_window - 1)  # the last step's, past the window
                require(dropped <= recorded,
                        f"this model's sliding-window caches can drop the last {recorded} positions (the last step's), "
                        f"not {dropped}")  # fmt: skip
        for layer in getattr(cache, "layers", None) or [cache]:
            if getattr(layer, "is_initialized", True):  # a layer of blocks this server does not run holds nothing
                layer.crop(-dropped)
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[:, :length]
        self.length = length

    def trim_windows(self):
        """Before a step: sliding-window layers forget the positions that left their window, which they kept for a
        `crop` of the last step."""
        for layer in _sliding_layers(self.cache):
            if layer.is_initialized:
                layer.crop(0)

    def mask_with(self, new_mask: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor | None:
        """The mask of every position once `tokens` new ones with `new_mask` (None: all ones) join; None while all ones."""
        return extend_mask(self.attention_mask, new_mask, batch, self.length, tokens)

    def advance(self, mask: torch.Tensor | None, batch: int, tokens: int):
        """Records a step: `mask` (from `mask_with`) covers every position now."""
        self.attention_mask, self.length, self.batch_size = mask, self.length + tokens, batch

    def nbytes(self) -> int:
        """Bytes of every tensor this session holds (caches, mask, kept tensors)."""
        tensors = [*_cache_tensors(self.cache), self.attention_mask, *self.kept.values()]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)


def extend_mask(past_mask: torch.Tensor | None, new_mask: torch.Tensor | None, batch: int, past: int, tokens: int):
    """The attention mask of every position so far, given the past one and the new tokens' (None while all ones)."""
    if past_mask is None and new_mask is None:
        return None
    past_mask = past_mask if past_mask is not None else torch.ones(batch, past, dtype=torch.long)
    new_mask = new_mask if new_mask is not None else torch.ones(batch, tokens, dtype=torch.long)
    return torch.cat([past_mask.long(), new_mask.long().to(past_mask.device)], dim=1)


def _sliding_layers(cache) -> list:
    """The layers of a transformers cache that keep a sliding window of positions."""
    return [layer for layer in getattr(cache, "layers", None) or [] if getattr(layer, "is_sliding", False)]


def _cache_tensors(cache) -> list[torch.Tensor | None]:
    """The key and value tensors of a transformers cache (both halves of an encoder-decoder cache)."""
    if cache is None:
        return []
    if hasattr(cache, "self_attention_cache"):
        return _cache_tensors(cache.self_attention_cache) + _cache_tensors(cache.cross_attention_cache)
    return [tensor for layer in cache.layers for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None))]
