"""Torch → ONNX for every part of a release: the encoder with its pooling and normalisation, the
two heads, the bag-of-words model and the ensemble vote, each with dynamic batch (and sequence)
axes. ``torch.onnx.export`` does the work; what is written by hand here are the small torch
wrappers that put pooling, softmax and the vote inside the graphs (the exporter exports modules,
and the stage classes keep those steps in Python).

int8: ``onnxruntime.quantization.quantize_dynamic`` on the encoder, per channel (weights int8,
activations quantised per run). Measured on the test split through the gate, 16-text runs:
per-tensor weights lost 5.2 points of macro-F1; per channel, every operator, none (agreement
with torch 0.990) at 21 MB for the encoder instead of 87; per channel on MatMul only, 0.5 points.

*Shrunk*: the encoder with only its first layers (a pruning step that needs no retraining),
gated like every variant.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger("edge")

OPSET = 17
PARTS = ("encoder", "linear", "mlp", "bow", "ensemble")
"""The ONNX files of a variant: ``<part>.onnx``."""
QUANTIZED = ("encoder",)
"""What the int8 variant quantises: the encoder is 87 MB of the 93; the heads (0.6 MB), the
bag-of-words table (6 MB, a lookup) and the vote stay float32."""


def _torch_parts(release: dict[str, Path], weights: dict[str, float], layers: int | None) -> Any:
    import torch
    from safetensors.torch import load_file
    from torch import nn
    from transformers import AutoModel

    from servecore.pipeline.nets import ClassifierHead, HashedBagOfWords

    class PooledEncoder(nn.Module):
        """MiniLM → mean pooling over the mask → L2 normalisation, as the Encoder stage does."""

        def __init__(self, path: Path) -> None:
            super().__init__()
            self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
            if layers is not None:
                self.model.encoder.layer = self.model.encoder.layer[:layers]
                self.model.config.num_hidden_layers = layers

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    class Softmaxed(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, embedding: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.net(embedding), dim=-1)

    class BagOfWordsSum(nn.Module):
        """The hashed n-gram model as gather + per-row sum (``EmbeddingBag`` has no ONNX form
        the runtime runs well): bucket rows, times their weights, summed into their text's row."""

        def __init__(self, bow: HashedBagOfWords) -> None:
            super().__init__()
            self.table = nn.Parameter(bow.weights.weight.detach().clone())
            self.bias = nn.Parameter(bow.bias.detach().clone())

        def forward(
            self,
            indices: torch.Tensor,
            weights: torch.Tensor,
            rows: torch.Tensor,
            row_count: torch.Tensor,
        ) -> torch.Tensor:
            picked = self.table[indices] * weights.unsqueeze(-1)
            # A per-text sum as a product with a one-hot [texts, features] matrix: scatter-add
            # exports, but onnxruntime ran it as a plain scatter (the sums were wrong).
            positions = torch.arange(row_count.shape[0], dtype=rows.dtype).unsqueeze(1)
            onehot = (rows.unsqueeze(0) == positions).to(picked.dtype)
            return torch.softmax(onehot @ picked + self.bias, dim=-1)

    class Vote(nn.Module):
        def __init__(self, shares: list[float]) -> None:
            super().__init__()
            self.register_buffer("shares", torch.tensor(shares, dtype=torch.float32))

        def forward(
            self, linear: torch.Tensor, mlp: torch.Tensor, bow: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            probs = self.shares[0] * linear + self.shares[1] * mlp + self.shares[2] * bow
            return probs, probs.argmax(dim=1)

    def head(path: Path) -> nn.Module:
        config = json.loads((path / "config.json").read_text())
        net = ClassifierHead.from_config(config)
        net.load_state_dict(load_file(str(path / "weights.safetensors")))
        return Softmaxed(net.eval()).eval()

    bow_config = json.loads((release["bow"] / "config.json").read_text())
    bow = HashedBagOfWords(bow_config["num_buckets"], len(bow_config["labels"]))
    bow.load_state_dict(load_file(str(release["bow"] / "weights.safetensors")))
    total = sum(weights[k] for k in ("linear", "mlp", "bow"))
    shares = [weights[k] / total for k in ("linear", "mlp", "bow")]
    return {
        "encoder": PooledEncoder(release["encoder"]).eval(),
        "linear": head(release["linear"]),
        "mlp": head(release["mlp"]),
        "bow": BagOfWordsSum(bow).eval(),
        "ensemble": Vote(shares).eval(),
    }, bow_config["num_buckets"]


def export_fp32(
    release: dict[str, Path], weights: dict[str, float], out: Path, layers: int | None = None
) -> dict[str, Any]:
    """Write ``<part>.onnx`` for every part into ``out``; returns what the predictor needs to
    know beyond the files (the bag-of-words bucket count, the encoder's layers)."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    parts, buckets = _torch_parts(release, weights, layers)
    ids = torch.ones((2, 7), dtype=torch.long)
    embedding = torch.zeros((2, 384), dtype=torch.float32)
    probs = torch.full((2, 6), 1 / 6, dtype=torch.float32)
    batch, seq, k = "batch", "sequence", "features"
    plans = {
        "encoder": (
            (ids, ids.clone()),
            ["input_ids", "attention_mask"],
            ["embedding"],
            {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        ),
        "linear": ((embedding,), ["embedding"], ["probs"], {"embedding": {0: batch}}),
        "mlp": ((embedding,), ["embedding"], ["probs"], {"embedding": {0: batch}}),
        "bow": (
            (
                torch.tensor([1, 5, 9], dtype=torch.long),
                torch.tensor([0.5, 0.5, 1.0]),
                torch.tensor([0, 0, 1], dtype=torch.long),
                torch.zeros(2, dtype=torch.long),
            ),
            ["indices", "weights", "rows", "row_count"],
            ["probs"],
            {"indices": {0: k}, "weights": {0: k}, "rows": {0: k}, "row_count": {0: batch}},
        ),
        "ensemble": (
            (probs, probs, probs),
            ["linear", "mlp", "bow"],
            ["probs", "label_index"],
            {"linear": {0: batch}, "mlp": {0: batch}, "bow": {0: batch}},
        ),
    }
    for name, (args, inputs, outputs, axes) in plans.items():
        torch.onnx.export(
            parts[name],
            args,
            str(out / f"{name}.onnx"),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={**axes, **{o: {0: batch} for o in outputs}},
            opset_version=OPSET,
            dynamo=False,
        )
        logger.info("exported %s.onnx", name)
    return {"num_buckets": buckets, "encoder_layers": layers}


def quantize_int8(source: Path, out: Path) -> None:
    """``source``'s files with the encoder and heads dynamically quantised to int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out.mkdir(parents=True, exist_ok=True)
    for name in PARTS:
        if name in QUANTIZED:
            quantize_dynamic(
                str(source / f"{name}.onnx"),
                str(out / f"{name}.onnx"),
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
        else:
            shutil.copyfile(source / f"{name}.onnx", out / f"{name}.onnx")
    logger.info("quantised to int8 in %s", out)
