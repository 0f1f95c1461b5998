"""A run's outputs on disk: ``metrics.json``, ``image_scores.csv`` and ``maps.npz``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from patchlab.experiment import Result


def save_result(result: Result, out: str | Path) -> Path:
    """Write ``metrics.json``, ``image_scores.csv`` and ``maps.npz`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {**result.metrics, "config": result.config.to_dict()}
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    order = np.argsort(-result.image_scores, kind="stable")
    with open(out / "image_scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "score"])
        for i in order:
            writer.writerow(
                [
                    str(result.images.paths[i]),
                    int(result.images.labels[i]),
                    f"{result.image_scores[i]:.6g}",
                ]
            )
    np.savez_compressed(
        out / "maps.npz",
        maps=result.maps.astype(np.float32),
        masks=result.masks.astype(np.uint8),
        labels=result.images.labels,
        image_scores=result.image_scores,
        paths=np.array([str(p) for p in result.images.paths]),
    )
    return out
