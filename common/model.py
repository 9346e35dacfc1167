"""A task's model in its flat-vector form: what updates and global models carry.

Updates travel as one float32 vector, so both ends must agree on the order and shapes of
the parameters that vector covers. ``layout_id`` names that agreement: a peer compares ids
and refuses a vector built for another model instead of silently mis-assigning weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

#: Bump when the way parameters are flattened changes, so old peers' ids stop matching.
LAYOUT_VERSION = 1


def layout(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes, in the order ``get_flat`` concatenates them."""
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def layout_id(model: nn.Module) -> str:
    """Short, stable SHA3-256 hex of the layout version and layout (16 hex chars)."""
    text = f"qflare-layout-v{LAYOUT_VERSION};" + ";".join(
        f"{name}:{'x'.join(str(s) for s in shape)}" for name, shape in layout(model)
    )
    return hashlib.sha3_256(text.encode("utf-8")).hexdigest()[:16]


def n_params(model: nn.Module) -> int:
    """Length of the flat vector for ``model``."""
    return sum(p.numel() for p in model.parameters())


def get_flat(model: nn.Module) -> np.ndarray:
    """All parameters as one contiguous 1-D float32 array (a copy)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return np.ascontiguousarray(flat.to(torch.float32).cpu().numpy().copy())


def set_flat(model: nn.Module, vec: np.ndarray) -> None:
    """Load a flat vector into ``model`` in place.

    Raises ValueError (with the reason) unless ``vec`` is a 1-D float32 array of exactly the
    model's length: a silent cast or truncation would hide a layout mismatch.
    """
    if not isinstance(vec, np.ndarray):
        # ValueError, not TypeError: callers map every bad vector to one layout_mismatch.
        raise ValueError(f"expected a numpy array, got {type(vec).__name__}")  # noqa: TRY004
    if vec.dtype != np.float32:
        raise ValueError(f"expected dtype float32, got {vec.dtype}")
    if vec.ndim != 1:
        raise ValueError(f"expected a 1-D vector, got shape {vec.shape}")
    expected = n_params(model)
    if vec.shape[0] != expected:
        raise ValueError(f"expected length {expected}, got {vec.shape[0]}")
    src = torch.from_numpy(np.ascontiguousarray(vec))
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(src[offset : offset + n].view_as(p))
            offset += n


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """``torch.manual_seed(seed)`` for building a model, restoring the caller's RNG afterwards:
    deterministic initial weights without disturbing anyone else's random stream."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        yield
    finally:
        torch.random.set_rng_state(state)
