"""The neighbour table and the features on a Dask LocalCluster against the local path.

    python benchmarks/scaling.py                         # demo:31360x25 tile:50000x25
    python benchmarks/scaling.py --cases demo:31360x25 --workers 2 --strip-rows 4096

Each engine runs in its own process on the same bank (real pretrained features, the banks of
``benchmarks/knn.py``): the local self-kNN (:func:`patchlab.knn.knn`, symmetric blocks, all
cores as torch threads) and :func:`patchlab.distributed.knn_on_cluster` on a LocalCluster of
``--workers`` single-threaded worker processes (started and warmed up before the clock). The
script prints both times, their ratio, whether the tables are identical, and, from Dask's task
stream, the compute time per strip, from which docs/scaling.md's model extrapolates to N
workers. Features: seconds per image of the local forward pass and of the cluster's, on the
demo's images (the cluster's include sending results back).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from knn import prepare_bank  # noqa: E402  (benchmarks/knn.py: the real banks)

DEFAULT_CASES = ("demo:31360x25", "tile:50000x25")


def local_table(path: str, k: int) -> dict:
    import torch

    from patchlab.knn import knn

    x = torch.from_numpy(np.load(path))
    knn(x[:2048], k, progress=False)  # warm-up (compiled merge)
    t0 = time.perf_counter()
    table = knn(x, k, progress=False)
    seconds = time.perf_counter() - t0
    np.save(path + ".local.npy", table.indices.numpy())
    return {"seconds": seconds, "threads": torch.get_num_threads()}


def cluster_table(path: str, k: int, workers: int, strip_rows: int) -> dict:
    import torch
    from distributed import Client, get_task_stream

    from patchlab.distributed import knn_on_cluster, local_cluster
    from patchlab.knn import knn

    x = torch.from_numpy(np.load(path))
    cluster = local_cluster(workers)
    with Client(cluster) as client:
        # warm-up: every worker imports patchlab and compiles the merge before the clock
        client.run(lambda: knn(torch.randn(2048, 8), 3, progress=False) and None)
        with get_task_stream(client) as stream:
            t0 = time.perf_counter()
            table = knn_on_cluster(client, x, k, strip_rows=strip_rows, progress=False)
            seconds = time.perf_counter() - t0
        # each worker's peak resident memory (its share of the bank, the search's blocks)
        peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        tasks = [
            s["stop"] - s["start"]
            for t in stream.data
            if str(t["key"]).startswith("_knn_task")
            for s in t["startstops"]
            if s["action"] == "compute"
        ]
    cluster.close()
    np.save(path + ".cluster.npy", table.indices.numpy())
    return {
        "seconds": seconds,
        "task_seconds": tasks,
        "strips": math.ceil(len(x) / strip_rows),
        "worker_peak_mb": max(peaks.values()),
        "bank_mb": x.numel() * 4 / 2**20,
    }


def features(workers: int, n: int, batch_size: int, where: str) -> dict:
    from patchlab.data import load_mvtec
    from patchlab.demo import demo_path, make_demo_data

    root = make_demo_data(demo_path())
    paths = [p for c in ("brick", "washer") for p in load_mvtec(root, c, "mix").paths][:n]
    opts = dict(kind="patch", resize=256, crop=224)
    if where == "local":
        from patchlab.backbones import build_backbone
        from patchlab.features import forward

        model = build_backbone("efficientnet_lite0", "imagenet")
        forward(paths[:batch_size], model, batch_size=batch_size, progress=False, **opts)
        t0 = time.perf_counter()
        forward(paths, model, batch_size=batch_size, progress=False, **opts)
        return {"seconds_per_image": (time.perf_counter() - t0) / len(paths)}
    from distributed import Client

    from patchlab.distributed import _features_task, forward_on_cluster, local_cluster
    from patchlab.features import forward

    cluster = local_cluster(workers)
    kw = dict(backbone="efficientnet_lite0", weights="imagenet", seed=0, device="cpu")
    with Client(cluster) as client:
        # warm-up on every worker: each builds its backbone once and runs one batch
        model = (kw["backbone"], kw["weights"], kw["seed"], kw["device"])
        client.run(_features_task, paths[:batch_size], forward=forward, model=model, **opts)
        t0 = time.perf_counter()
        forward_on_cluster(
            client, forward, paths, batch_size=batch_size, progress=False, **opts, **kw
        )
        seconds = time.perf_counter() - t0
    cluster.close()
    return {"seconds_per_image": seconds / len(paths)}


def child(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(args)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--strip-rows", type=int, default=4096)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, *rest = json.loads(args.child)
        print(
            json.dumps(
                {"local": local_table, "cluster": cluster_table, "features": features}[name](*rest)
            )
        )
        return
    print(f"{os.cpu_count()} cores; LocalCluster of {args.workers} single-threaded workers")
    for case in args.cases:
        name, size = case.split(":")
        n, k = (int(v) for v in size.split("x"))
        path = prepare_bank(name, n)
        d = np.load(path, mmap_mode="r").shape[1]
        local = child(["local", path, k])
        spread = child(["cluster", path, k, args.workers, args.strip_rows])
        same = np.array_equal(np.load(path + ".local.npy"), np.load(path + ".cluster.npy"))
        tasks = np.array(spread["task_seconds"])
        # the model's constant: compute seconds per (query row x bank row x feature)
        c = tasks.sum() / (n * n * d)
        print(
            f"{case} (d={d}): local {local['seconds']:.2f} s ({local['threads']} threads), "
            f"cluster {spread['seconds']:.2f} s ({spread['strips']} strips of "
            f"{args.strip_rows}, {tasks.mean():.2f} s each, {tasks.sum():.1f} s of compute); "
            f"cluster/local {spread['seconds'] / local['seconds']:.2f}; identical tables: {same}; "
            f"c = {c:.3e} s per row pair per dim; worker peak {spread['worker_peak_mb']:.0f} MB "
            f"(bank {spread['bank_mb']:.0f} MB)"
        )
    local = child(["features", args.workers, args.images, args.batch_size, "local"])
    spread = child(["features", args.workers, args.images, args.batch_size, "cluster"])
    print(
        f"features (efficientnet_lite0, {args.images} images, batch {args.batch_size}): local "
        f"{local['seconds_per_image'] * 1e3:.1f} ms/image, cluster "
        f"{spread['seconds_per_image'] * 1e3:.1f} ms/image; cluster/local "
        f"{spread['seconds_per_image'] / local['seconds_per_image']:.2f}"
    )


if __name__ == "__main__":
    main()
