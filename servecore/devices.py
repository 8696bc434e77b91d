"""Device resolution (DESIGN contract 5): ``auto`` picks CUDA when torch can see it."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """Map a spec's ``device`` to a torch device.

    ``auto`` falls back to the CPU when CUDA is absent — also when Ray grants a logical GPU that
    torch cannot see. An explicit ``cuda`` without CUDA is a configuration error, not a silent
    fallback.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use 'auto'")
    return resolved


def set_torch_threads(num_threads: int | None) -> None:
    """Match torch's intra-op threads to the CPUs the process was granted."""
    if num_threads is not None and num_threads > 0:
        torch.set_num_threads(num_threads)
