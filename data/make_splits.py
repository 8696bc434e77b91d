"""Rebuild data/intents.csv (id, text, label, split) from data/raw/<label>.txt.

The split is stratified, 80/20, seeded: rerunning it yields the same file. Run from the repo root:
``python data/make_splits.py``.
"""

import csv
import random
from pathlib import Path

LABELS = ["billing", "delivery", "returns", "technical_issue", "account_access", "general_inquiry"]
TEST_FRACTION = 0.2
SEED = 20261121

root = Path(__file__).resolve().parent
rows = []
rng = random.Random(SEED)
for label in LABELS:
    texts = [t.strip() for t in (root / "raw" / f"{label}.txt").read_text().splitlines() if t.strip()]
    order = list(range(len(texts)))
    rng.shuffle(order)
    n_test = round(len(texts) * TEST_FRACTION)
    test = set(order[:n_test])
    for i, text in enumerate(texts):
        rows.append({"text": text, "label": label, "split": "test" if i in test else "train"})
rng.shuffle(rows)
with open(root / "intents.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["id", "text", "label", "split"])
    writer.writeheader()
    for n, row in enumerate(rows):
        writer.writerow({"id": f"msg-{n:05d}", **row})
print(f"wrote {len(rows)} rows to {root / 'intents.csv'}")
