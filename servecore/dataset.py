"""The shipped intent dataset (``data/intents.csv``): fixed train/test split, six labels."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

from servecore.settings import project_root


def dataset_path() -> Path:
    return project_root() / "data" / "intents.csv"


def load_split(
    split: Literal["train", "test"], path: Path | None = None
) -> tuple[list[str], list[str]]:
    """Texts and labels of one split."""
    with open(path or dataset_path(), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    return [r["text"] for r in rows], [r["label"] for r in rows]
