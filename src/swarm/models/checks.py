"""Checks of a request's tensors that several families share; each raises `BadRequestError` naming what is wrong."""

from __future__ import annotations

import torch

from swarm.errors import BadRequestError


def require(condition: bool, message: str):
    """Raises `BadRequestError(message)` unless `condition` holds."""
    if not condition:
        raise BadRequestError(message)


def check_names(inputs: dict, allowed: set[str], what: str):
    unexpected = set(inputs) - allowed
    require(not unexpected, f"unexpected tensors {sorted(unexpected)} for {what}")


def check_hidden_states(inputs: dict, name: str, width: int, dtype: torch.dtype) -> tuple[int, int]:
    """Checks `inputs[name]` is (batch, tokens, width) in `dtype`; returns (batch, tokens)."""
    hidden = inputs.get(name)
    require(hidden is not None, f"request has no {name!r} tensor")
    require(
        hidden.ndim == 3 and hidden.shape[-1] == width and hidden.shape[0] > 0 and hidden.shape[1] > 0,
        f"{name} must have shape (batch, tokens, {width}), got {tuple(hidden.shape)}",
    )
    require(hidden.dtype == dtype, f"{name} must be {dtype} on this server, got {hidden.dtype}")
    return hidden.shape[0], hidden.shape[1]


def check_mask(mask: torch.Tensor | None, name: str, batch: int, length: int):
    if mask is not None:
        require(
            tuple(mask.shape) == (batch, length) and not mask.is_floating_point(),
            f"{name} must be an integer or bool tensor of shape ({batch}, {length}), got {tuple(mask.shape)}",
        )


def check_position_ids(positions: torch.Tensor | None, batch: int, tokens: int):
    if positions is None:
        return
    require(
        positions.dtype == torch.int64 and positions.ndim == 2 and positions.shape[0] in (1, batch),
        f"position_ids must be int64 of shape (batch or 1, {tokens}), got {positions.dtype} {tuple(positions.shape)}",
    )
    require(positions.shape[1] == tokens, f"position_ids cover {positions.shape[1]} tokens, not {tokens}")


def check_output_layers(wanted: torch.Tensor | None, blocks: int):
    if wanted is not None:
        require(
            wanted.dtype == torch.int64 and wanted.ndim == 1 and wanted.numel() <= blocks,
            f"output_layers must be int64 of shape (k,) with k <= {blocks}, got {wanted.dtype} {tuple(wanted.shape)}",
        )
