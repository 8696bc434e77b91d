"""The GPU benchmark's smoke test on the CPU: the bundle it carries and one tiny run of every part.

The real run happens on a lent GPU machine (``bench/gpu.py``); here it must build its bundle within
the 64 MiB that travels, agree with the float32 reference, and produce every row it promises.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import gpu


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return gpu.prepare(tmp_path_factory.mktemp("gpu-bundle"), reference_texts=16)


def test_bundle_fits_what_travels_and_holds_half_precision_weights(bundle):
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    assert size < 50 * 2**20  # 64 MiB travel in all, the repository included
    from safetensors import safe_open

    with safe_open(str(bundle / gpu.MODEL_FOLDER / "model.safetensors"), "pt") as weights:
        dtypes = {str(weights.get_tensor(name).dtype) for name in weights.keys()}  # noqa: SIM118
    assert dtypes == {"torch.float16"}
    reference = np.load(bundle / gpu.REFERENCE_FILE)["embedding"]
    assert reference.shape == (16, 384)
    np.testing.assert_allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-5)


def test_cpu_run_measures_every_point_and_agrees_with_the_reference(bundle, tmp_path):
    output = tmp_path / "gpu.json"
    code = gpu.main(
        [
            "run",
            "--model-dir",
            str(bundle / gpu.MODEL_FOLDER),
            "--device",
            "cpu",
            "--dtypes",
            "float32,float16",
            "--batch-sizes",
            "1,4",
            "--shared-batch-sizes",
            "4",
            "--processes",
            "1,2",
            "--seconds",
            "0.2",
            "--max-calls",
            "5",
            "--threads",
            "1",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    result = json.loads(output.read_text())
    rows = {(p["mode"], p["dtype"], p["batch_size"], p["processes"]) for p in result["points"]}
    assert rows == {
        *(("sweep", d, b, 1) for d in ("float32", "float16") for b in (1, 4)),
        *(("shared", d, 4, n) for d in ("float32", "float16") for n in (1, 2)),
    }
    for point in result["points"]:
        assert point["calls"] >= 1 and point["texts_per_s"] > 0
        assert 0 < point["p50_ms"] <= point["p95_ms"]
        assert (point["tokenize_ms"] is not None) == (point["mode"] == "sweep")
    # The float16-rounded weights give the float32 CPU answers back almost exactly.
    for dtype in ("float32", "float16"):
        assert result["agreement_with_float32_cpu"][dtype]["min_cosine"] > 0.999
    assert set(result["summary"]["shared_card_speedup"]) == {"float32@4x2", "float16@4x2"}
    assert result["environment"]["device"] == "cpu"


def test_run_without_a_bundle_says_how_to_make_one(tmp_path, capsys):
    code = gpu.main(["run", "--model-dir", str(tmp_path / "absent"), "--device", "cpu"])
    assert code == 2
    assert "make gpu-bundle" in capsys.readouterr().err
