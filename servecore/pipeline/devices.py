"""Device resolution (DESIGN contract 5): ``auto`` picks CUDA when it is there and granted."""

from __future__ import annotations

import sys

import torch


def resolve_device(device: str) -> torch.device:
    """Map a spec's ``device`` to a torch device.

    ``auto`` falls back to the CPU when CUDA is absent, when Ray grants a logical GPU that torch
    cannot see, and inside a Ray worker that was granted no GPU. An explicit ``cuda`` without CUDA
    is a configuration error, not a silent fallback.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and _granted_gpu() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use 'auto'")
    return resolved


def _granted_gpu() -> bool:
    """Inside a Ray worker, only a GPU that Ray reserved for it counts: Ray leaves CUDA visible to
    ``num_gpus: 0`` actors, which would otherwise share a card nobody accounted for."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return True
    return bool(ray.get_gpu_ids())


def set_torch_threads(num_threads: int | None) -> None:
    """Match torch's intra-op threads to the CPUs the process was granted."""
    if num_threads is not None and num_threads > 0:
        torch.set_num_threads(num_threads)
