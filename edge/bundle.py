"""The edge bundle's layout: ONNX files, tokenizer files, the predictor and a manifest with every
file's size and SHA-256, plus the archive and the channel manifest that devices poll."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

from edge.onnx_export import PARTS
from edge.predictor import MANIFEST, sha256_of

ROOT = Path(__file__).resolve().parents[1]
PREDICTOR = Path(__file__).with_name("predictor.py")
FEATURES = ROOT / "servecore" / "pipeline" / "features.py"
REQUIREMENTS = "onnxruntime>=1.20\nnumpy>=1.26\ntokenizers>=0.20\n"
"""All the bundle's predictor needs (``requirements.txt`` in the bundle)."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def write_bundle(
    onnx_dir: Path, tokenizer_dir: Path, info: dict[str, Any], out: Path
) -> dict[str, Any]:
    """Assemble a bundle folder ``out`` from exported ONNX files and the encoder's tokenizer
    files; ``info`` goes into the manifest (version, labels, sources, metrics, ...). Returns the
    manifest written."""
    if out.exists():
        shutil.rmtree(out)
    (out / "tokenizer").mkdir(parents=True)
    for part in PARTS:
        shutil.copyfile(onnx_dir / f"{part}.onnx", out / f"{part}.onnx")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / "tokenizer" / name)
    shutil.copyfile(PREDICTOR, out / "predictor.py")
    shutil.copyfile(FEATURES, out / "intent_edge_features.py")
    (out / "requirements.txt").write_text(REQUIREMENTS)
    files = {
        str(path.relative_to(out)): {"size": path.stat().st_size, "sha256": sha256_of(path)}
        for path in sorted(out.rglob("*"))
        if path.is_file()
    }
    manifest = {**info, "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def archive(bundle: Path, folder: Path, base_url: str = "") -> tuple[Path, Path]:
    """``intent-edge-<version>.tar.gz`` of a bundle and the channel manifest
    ``latest.json`` beside it (what :func:`edge.predictor.update` reads)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    version = str(manifest["version"])
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"intent-edge-{version}.tar.gz"
    with tarfile.open(target, "w:gz") as tar:
        for path in sorted(bundle.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(bundle)), recursive=False)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    channel = {
        "name": manifest.get("name", "intent-edge"),
        "version": version,
        "archive": f"{base_url}{target.name}",
        "sha256": digest,
        "size": target.stat().st_size,
        "metrics": manifest.get("metrics", {}),
    }
    latest = folder / "latest.json"
    latest.write_text(json.dumps(channel, indent=2))
    return target, latest
