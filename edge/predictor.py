"""The edge bundle's predictor: intent labels on a device, with onnxruntime, numpy and tokenizers
only (no torch, no Ray, no MLflow, no server).

A bundle is a folder: ``manifest.json`` (source model versions, metrics, sizes, checksums),
``<part>.onnx`` (encoder with pooling and normalisation, linear and MLP heads, bag-of-words,
ensemble vote), ``tokenizer/tokenizer.json``, this file and ``intent_edge_features.py`` (the
bag-of-words hashing, the server's own code copied).

Python::

    from predictor import EdgePredictor
    EdgePredictor("bundle/").predict(["I was charged twice"])
    # [{"label": "billing", "probabilities": {"billing": 0.93, ...}}]

Command line (texts from a file or stdin, one per line; a JSON line per answer)::

    python predictor.py --bundle bundle/ texts.txt
    python predictor.py update --root /opt/intent --manifest https://host/intent-edge/latest.json
    python predictor.py rollback --root /opt/intent

**Field updates.** Installed bundles live under ``ROOT/versions/<version>/``; ``ROOT/current``
and ``ROOT/previous`` are symbolic links. ``update`` reads a channel manifest (a path or an
HTTP(S) URL: ``{"name", "version", "archive", "sha256", "size"}``, ``archive`` relative to the
manifest), and only for a newer version downloads the archive, checks its size and SHA-256,
unpacks it beside the others, checks every file against the bundle's own manifest, loads it and
answers one text; only then does ``current`` move to it (an atomic rename) and ``previous`` keep
the old one. Anything that fails on the way is refused and the old bundle keeps answering.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:  # in a bundle: the copy beside this file
    from intent_edge_features import hashed_features
except ImportError:  # in the project
    from servecore.pipeline.features import hashed_features

MANIFEST = "manifest.json"
SMOKE_TEXT = "I was charged twice for my order"


class BundleError(Exception):
    """A bundle or an update that is refused; the message says why."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_files(folder: Path) -> dict[str, Any]:
    """The bundle's manifest, once every file it lists has its size and checksum."""
    try:
        manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{folder}: no readable {MANIFEST}: {e}") from e
    for name, expected in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{folder}: {name} is missing")
        if path.stat().st_size != expected["size"] or sha256_of(path) != expected["sha256"]:
            raise BundleError(f"{folder}: {name} does not match its checksum")
    return manifest


class EdgePredictor:
    """The ensemble of a bundle, on onnxruntime's CPU provider."""

    def __init__(self, folder: str | os.PathLike[str], threads: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.folder = Path(folder).resolve()
        self.manifest = check_files(self.folder)
        self.labels: list[str] = list(self.manifest["labels"])
        self.num_buckets = int(self.manifest["num_buckets"])
        self.max_length = int(self.manifest["max_length"])
        self.version = str(self.manifest["version"])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {
            part: ort.InferenceSession(
                str(self.folder / f"{part}.onnx"), options, providers=["CPUExecutionProvider"]
            )
            for part in ("encoder", "linear", "mlp", "bow", "ensemble")
        }
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer" / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.max_length)
        pad = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(pad_id=0 if pad is None else pad, pad_token="[PAD]")

    def embed(self, texts: Sequence[str], chunk: int = 1) -> np.ndarray:
        """Sentence embeddings, ``chunk`` texts per run (longest first). One by default: int8's
        dynamic quantization scales activations per run, so a text's answer would otherwise
        depend on the texts batched with it; and one at a time is the fastest on CPUs here."""
        encodings = self.tokenizer.encode_batch(list(texts))
        lengths = np.asarray([sum(e.attention_mask) for e in encodings])
        out = np.empty((len(texts), 384), dtype=np.float32)
        order = np.argsort(-lengths, kind="stable")
        for start in range(0, len(order), chunk):
            rows = order[start : start + chunk]
            width = max(int(lengths[rows].max()), 1)
            ids = np.asarray([encodings[i].ids[:width] for i in rows], dtype=np.int64)
            mask = np.asarray([encodings[i].attention_mask[:width] for i in rows], dtype=np.int64)
            (embedding,) = self.sessions["encoder"].run(
                None, {"input_ids": ids, "attention_mask": mask}
            )
            out[rows] = embedding
        return out

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """The ensemble's probabilities, one row per text in :attr:`labels` order."""
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        embedding = self.embed(texts)
        (linear,) = self.sessions["linear"].run(None, {"embedding": embedding})
        (mlp,) = self.sessions["mlp"].run(None, {"embedding": embedding})
        indices, offsets, weights = hashed_features(texts, self.num_buckets)
        counts = np.diff(np.append(offsets, len(indices)))
        rows = np.repeat(np.arange(len(texts), dtype=np.int64), counts)
        (bow,) = self.sessions["bow"].run(
            None,
            {
                "indices": indices,
                "weights": weights,
                "rows": rows,
                "row_count": np.zeros(len(texts), dtype=np.int64),
            },
        )
        probs, _ = self.sessions["ensemble"].run(None, {"linear": linear, "mlp": mlp, "bow": bow})
        return np.asarray(probs, dtype=np.float32)

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        probs = self.probabilities(texts)
        return [
            {
                "label": self.labels[int(row.argmax())],
                "probabilities": {
                    k: round(float(p), 6) for k, p in zip(self.labels, row, strict=True)
                },
            }
            for row in probs
        ]


# --- field updates ---------------------------------------------------------------------------


def _fetch(location: str, target: Path) -> None:
    """A path or an ``http(s)://`` / ``file://`` URL, copied to ``target``."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme in ("http", "https", "file"):
        with urllib.request.urlopen(location, timeout=60) as answer, target.open("wb") as out:
            shutil.copyfileobj(answer, out)
    else:
        shutil.copyfile(location, target)


def _read_manifest(location: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "channel.json"
        try:
            _fetch(location, path)
            channel: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BundleError(f"cannot read the manifest at {location}: {e}") from e
    for key in ("version", "archive", "sha256", "size"):
        if key not in channel:
            raise BundleError(f"the manifest at {location} has no {key!r}")
    return channel


def _version_key(version: str) -> tuple[int, ...] | tuple[str]:
    return (
        tuple(int(p) for p in version.split("."))
        if version.replace(".", "").isdigit()
        else (version,)
    )


def current_version(root: Path) -> str | None:
    link = root / "current"
    if not link.exists():
        return None
    return str(json.loads((link / MANIFEST).read_text())["version"])


def _point(root: Path, name: str, target: Path) -> None:
    """``root/name`` → ``target``, replaced atomically (a new link renamed over the old)."""
    fresh = root / f".{name}.new"
    if fresh.is_symlink() or fresh.exists():
        fresh.unlink()
    fresh.symlink_to(target.relative_to(root))
    os.replace(fresh, root / name)


def install(root: Path, folder: Path) -> None:
    """Make ``folder`` (already under ``root/versions``) current; keep the old one as previous."""
    old = (root / "current").resolve() if (root / "current").exists() else None
    if old is not None:
        _point(root, "previous", old)
    _point(root, "current", folder)


def update(root: str | os.PathLike[str], manifest_url: str) -> str | None:
    """Install the channel's version if it is newer than the current one; returns it, or None
    when there is nothing newer. Raises :class:`BundleError` (nothing changed) when the download
    or the bundle is not right."""
    root = Path(root).resolve()
    (root / "versions").mkdir(parents=True, exist_ok=True)
    channel = _read_manifest(manifest_url)
    version = str(channel["version"])
    installed = current_version(root)
    if installed is not None and _version_key(version) <= _version_key(installed):
        return None
    archive_url = urllib.parse.urljoin(manifest_url, channel["archive"])
    if "://" not in manifest_url:
        archive_url = str(Path(manifest_url).resolve().parent / channel["archive"])
    staging = Path(tempfile.mkdtemp(prefix=".update-", dir=root))
    try:
        archive = staging / "bundle.tar.gz"
        try:
            _fetch(archive_url, archive)
        except OSError as e:
            raise BundleError(f"download of {archive_url} failed: {e}") from e
        if archive.stat().st_size != int(channel["size"]):
            raise BundleError(
                f"download of {archive_url} is {archive.stat().st_size} bytes, "
                f"expected {channel['size']} (incomplete or wrong file)"
            )
        if sha256_of(archive) != channel["sha256"]:
            raise BundleError(f"download of {archive_url} does not match its SHA-256")
        unpacked = staging / "bundle"
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
        manifest = check_files(unpacked)
        if str(manifest["version"]) != version:
            raise BundleError(f"the archive holds version {manifest['version']}, not {version}")
        answer = EdgePredictor(unpacked).predict([SMOKE_TEXT])
        if not answer or answer[0]["label"] not in manifest["labels"]:
            raise BundleError("the new bundle does not answer")
        target = root / "versions" / version
        if target.exists():
            shutil.rmtree(target)
        unpacked.rename(target)
        install(root, target)
        return version
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def rollback(root: str | os.PathLike[str]) -> str:
    """Swap ``current`` and ``previous``; returns the version now current."""
    root = Path(root).resolve()
    if not (root / "previous").exists():
        raise BundleError(f"{root}: no previous bundle to roll back to")
    old, new = (root / "current").resolve(), (root / "previous").resolve()
    _point(root, "current", new)
    _point(root, "previous", old)
    return str(json.loads((new / MANIFEST).read_text())["version"])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("update", "rollback"):
        parser = argparse.ArgumentParser(prog="predictor.py " + argv[0])
        parser.add_argument("--root", required=True, help="folder of the installed bundles")
        if argv[0] == "update":
            parser.add_argument("--manifest", required=True, help="channel manifest path or URL")
        args = parser.parse_args(argv[1:])
        try:
            if argv[0] == "update":
                found = update(args.root, args.manifest)
                print(json.dumps({"updated": found is not None, "version": found}))
            else:
                print(json.dumps({"rolled_back_to": rollback(args.root)}))
        except BundleError as e:
            print(f"refused: {e}", file=sys.stderr)
            return 2
        return 0
    parser = argparse.ArgumentParser(prog="predictor.py", description="intent labels, offline")
    parser.add_argument(
        "input", nargs="?", default="-", help="file of texts, one per line; - stdin"
    )
    parser.add_argument("--bundle", help="bundle folder (default: this file's folder)")
    parser.add_argument("--root", help="or: the folder of installed bundles (uses current)")
    args = parser.parse_args(argv)
    folder = (
        Path(args.root) / "current" if args.root else Path(args.bundle or Path(__file__).parent)
    )
    predictor = EdgePredictor(folder)
    stream = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")  # noqa: SIM115
    with stream:
        texts = [line.rstrip("\n") for line in stream if line.strip()]
    for text, answer in zip(texts, predictor.predict(texts), strict=True):
        print(json.dumps({"text": text, **answer}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
