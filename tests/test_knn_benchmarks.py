"""benchmarks/knn.py and benchmarks/knn_profile.py run end to end on a tiny bank."""

import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_knn_benchmark_prints_every_backend_against_faiss():
    text = run(
        str(BENCH / "knn.py"),
        "--cases",
        "mixture:3000x16x5",
        "--backends",
        "torch",
        "faiss",
        "floor",
        "--check",
        "200",
    )
    rows = {line.split()[3]: line.split() for line in text.splitlines() if "mixture" in line}
    assert set(rows) == {"faiss", "torch", "floor"}
    assert rows["torch"][-1] == "1.0000"  # every sampled row equals the float64 brute force
    assert float(rows["faiss"][5]) == 1.0 and float(rows["torch"][5]) > 0  # x faiss


def test_knn_profile_splits_the_time(tmp_path):
    rng = np.random.default_rng(0)
    bank = tmp_path / "bank.npy"
    np.save(bank, rng.standard_normal((6000, 24)).astype(np.float32))
    text = run(str(BENCH / "knn_profile.py"), str(bank), "--k", "5")
    total = float(next(line for line in text.splitlines() if line.startswith("K = 5")).split()[3])
    lines = [line for line in text.splitlines() if line.startswith("  ")]
    parts = {line[:26].strip(): float(line[26:].split()[0]) for line in lines}
    assert {"GEMM", "merge, both-way blocks", "re-rank (float64)", "the rest"} <= set(parts)
    assert parts["GEMM"] > 0
    assert abs(sum(parts.values()) - total) <= 0.01 * len(parts)  # the parts add up
