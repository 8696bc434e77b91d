"""Classifier-head stage: embeddings → label probabilities (linear or MLP, from the registry)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import load_file

from servecore.pipeline.batching import Batch
from servecore.pipeline.devices import resolve_device, set_torch_threads
from servecore.pipeline.nets import ClassifierHead as HeadNet
from servecore.registry.client import open_model


class ClassifierHead:
    """``{"embedding": float32[n, d]}`` → ``{"probs": float32[n, labels]}``."""

    def __init__(
        self,
        model_uri: str | None = None,
        model_dir: str | os.PathLike[str] | None = None,
        device: str = "auto",
        num_threads: int | None = None,
    ) -> None:
        set_torch_threads(num_threads)
        self.model_ref, path = open_model(model_uri, model_dir, artifact="head")
        config = json.loads((path / "config.json").read_text())
        self.labels: tuple[str, ...] = tuple(config["labels"])
        self.kind: str = config["kind"]
        self.device = resolve_device(device)
        net = HeadNet.from_config(config)
        net.load_state_dict(load_file(str(path / "weights.safetensors")))
        self._net = net.to(self.device).eval()

    def __call__(self, batch: Batch) -> Batch:
        # A copy: arrays that Ray deserialised are read-only, which torch warns about.
        embeddings = torch.from_numpy(np.array(batch["embedding"], dtype=np.float32))
        with torch.inference_mode():
            probs = torch.softmax(self._net(embeddings.to(self.device)), dim=-1)
        return {"probs": probs.cpu().numpy()}
