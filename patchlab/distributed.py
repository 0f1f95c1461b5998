"""Features and the neighbour table on a Dask cluster (the optional ``dask`` extra).

    patchlab run DATA --category C --scheduler local          # a LocalCluster on this machine
    patchlab run DATA --category C --scheduler tcp://host:8786 # an existing cluster

Two steps of a run are split into tasks; everything else stays in this process:

- **features**: the images in chunks of ``batch_size`` (the local path's batches), each task
  reading its images and running the backbone, which each worker builds once. The workers read
  the images (and a ``--weights`` file) from their paths: on a cluster of several machines,
  they must lie on storage the workers share.
- **neighbour table**: row strips of the query × bank grid. The bank is sent to every worker
  once (``scatter(broadcast=True)``: a lost worker's copy is on the others); a task computes
  its rows' exact k nearest over the whole bank with :func:`patchlab.knn.knn` (the same
  certified float64 re-rank as a local run) and returns them; the strips are stacked in order.
  Rows are independent, so the stacked table is the local table, neighbour for neighbour, up
  to exact ties (broken by index in both). A strip does the whole row of block pairs: the
  local self-kNN computes each pair once for both of its strips (half the GEMM work), which a
  cluster buys back with workers (docs/scaling.md).

A task lost with its worker is run again by Dask elsewhere; the result does not change.
Memory per worker: the bank (n_bank × d × 4 bytes), the task's queries, its GEMM blocks
(about 3 × 2048² × 4 bytes = 50 MB on the CPU) and its candidates (rows × (k + pool) × 12
bytes). Results land in the same cache as a local run: the cache keys do not include the
scheduler, because the results do not depend on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from patchlab.backbones import MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD
from patchlab.knn import Engine, Neighbours, knn

STRIP_ROWS = 4096  # rows of queries per neighbour task
_CLIENTS: dict[str, object] = {}  # one client per scheduler address in this process
_MODELS: dict[tuple, torch.nn.Module] = {}  # each worker's backbones, built once


def connect(scheduler: str):
    """A ``distributed.Client`` for ``scheduler``: ``"local"`` (a LocalCluster of one
    single-threaded worker process per core, on 127.0.0.1, :func:`local_cluster`) or a
    scheduler's address. Clients are kept for the life of the process (a widget re-running
    does not start a new cluster)."""
    try:
        from distributed import Client
    except ImportError:
        raise ImportError(
            "--scheduler needs Dask: pip install 'patchlab[dask]' (dask[distributed])"
        ) from None
    client = _CLIENTS.get(scheduler)
    if client is not None and client.status == "running":
        return client
    if scheduler == "local":
        client = Client(local_cluster())
    else:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as err:
            raise OSError(
                f"no Dask scheduler answered at {scheduler!r} within 10 s ({err}); start one "
                "(`dask scheduler`, then `dask worker ADDRESS` on each machine) or use "
                "--scheduler local"
            ) from None
    _CLIENTS[scheduler] = client
    return client


# Dask's nannies set MALLOC_TRIM_THRESHOLD_=65536 in their workers, which also fixes glibc's
# mmap threshold at 128 KiB: every convolution buffer is then a fresh mmap, and the backbone
# ran 2.3x slower per image (126 ms against 56 ms, one thread; docs/scaling.md). The workers
# get the CLI's thresholds instead (patchlab.backbones.tune_malloc).
WORKER_ENV = {
    "MALLOC_TRIM_THRESHOLD_": str(MALLOC_TRIM_THRESHOLD),
    "MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD),
}


def local_cluster(n_workers: int | None = None):
    """A ``distributed.LocalCluster`` of ``n_workers`` (default: one per core) single-threaded
    worker processes, listening on 127.0.0.1 only (dashboard on a free port), with
    :data:`WORKER_ENV`."""
    import dask
    from distributed import LocalCluster

    # glibc reads these when a process starts: the nanny's pre-spawn environment, not `env`
    spawn = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENV.items()}
    with dask.config.set(spawn):
        return LocalCluster(
            n_workers=n_workers or os.cpu_count() or 1,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        )


def close_all() -> None:
    """Close every client this process opened (and the LocalClusters behind them)."""
    for client in _CLIENTS.values():
        cluster = client.cluster
        client.close()
        if cluster is not None:
            cluster.close()
    _CLIENTS.clear()


def forward_on_cluster(
    client,
    forward: Callable,
    paths: list[Path],
    *,
    kind: str,
    backbone: str,
    weights: str | Path,
    seed: int,
    resize: int,
    crop: int | None,
    batch_size: int,
    device: str,
    progress: bool = True,
) -> torch.Tensor:
    """Features of ``paths`` (see :func:`patchlab.features.extract_features`), one task per
    batch of ``batch_size`` images; in the images' order, float32 on the CPU.

    ``forward`` is :func:`patchlab.features.forward` (passed in, so that this module does not
    import the features module that calls it); each worker runs it on its batches with its
    own copy of the backbone."""
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    model = (backbone, str(weights), seed, device)
    futures = client.map(
        _features_task,
        chunks,
        forward=forward,
        model=model,
        kind=kind,
        resize=resize,
        crop=crop,
        pure=False,
    )
    parts = _gather(client, futures, f"{kind} features (dask)", "batch", progress)
    return torch.from_numpy(np.concatenate(parts))


def _features_task(paths, *, forward, model, kind, resize, crop) -> np.ndarray:
    """On a worker: one batch's features, with the worker's own copy of the backbone."""
    from patchlab.backbones import build_backbone
    from patchlab.cache import resolve_device

    if model not in _MODELS:
        backbone, weights, seed, device = model
        _MODELS[model] = build_backbone(backbone, weights, seed).to(resolve_device(device))
    return forward(paths, _MODELS[model], kind, resize, crop, len(paths), False).numpy()


def knn_on_cluster(
    client,
    queries: torch.Tensor,
    k: int,
    bank: torch.Tensor | None = None,
    *,
    exclude: str = "self",
    query_ids: torch.Tensor | None = None,
    bank_ids: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    bank_groups: torch.Tensor | None = None,
    engine: Engine | None = None,
    strip_rows: int = STRIP_ROWS,
    progress: bool = True,
) -> Neighbours:
    """:func:`patchlab.knn.knn` with its rows split into strips computed on a Dask cluster.

    Same parameters and result as :func:`~patchlab.knn.knn` (a self-kNN when ``bank`` is
    None), plus ``strip_rows``, the queries per task. Each task searches the whole bank for its
    strip, with the strip's rows' own ids and groups, so the exclusions are the local ones.
    """
    if strip_rows < 1:
        raise ValueError(f"strip_rows must be >= 1, got {strip_rows}")
    queries = queries.detach().cpu().float()
    n = len(queries)
    if bank is None and exclude == "self" and query_ids is None:
        query_ids = torch.arange(n)  # self-kNN: identities are positions
    # every worker gets the arrays once; a task names them and its rows
    send = {
        "queries": queries,
        "bank": bank,
        "query_ids": query_ids,
        "bank_ids": bank_ids,
        "query_groups": query_groups,
        "bank_groups": bank_groups,
    }
    shared = {
        name: client.scatter(value.detach().cpu().numpy(), broadcast=True, hash=False)
        for name, value in send.items()
        if value is not None
    }
    futures = [
        client.submit(
            _knn_task, start, min(start + strip_rows, n), k, exclude, engine, pure=False, **shared
        )
        for start in range(0, n, strip_rows)
    ]
    parts = _gather(client, futures, "neighbours (dask)", "strip", progress)
    distances = torch.from_numpy(np.concatenate([d for d, _ in parts]))
    indices = torch.from_numpy(np.concatenate([i for _, i in parts]))
    return Neighbours(distances, indices, exclude)


def _knn_task(start, stop, k, exclude, engine, *, queries, bank=None, **keys):
    """On a worker: the exact k nearest of query rows ``start:stop`` over the whole bank."""
    rows = slice(start, stop)
    queries = torch.from_numpy(queries)
    # a self-kNN's bank is the queries, with their ids and groups
    side = "query" if bank is None else "bank"
    table = knn(
        queries[rows],
        k,
        queries if bank is None else torch.from_numpy(bank),
        exclude=exclude,
        query_ids=_key(keys, "query_ids", rows),
        bank_ids=_key(keys, f"{side}_ids"),
        query_groups=_key(keys, "query_groups", rows),
        bank_groups=_key(keys, f"{side}_groups"),
        engine=engine,
        progress=False,
    )
    return table.distances.numpy(), table.indices.numpy()


def _key(keys: dict, name: str, rows: slice = slice(None)) -> torch.Tensor | None:
    return torch.from_numpy(keys[name][rows]) if name in keys else None


def _gather(client, futures, desc: str, unit: str, progress: bool) -> list:
    """The futures' results in submission order, with a progress bar as they finish."""
    from distributed import as_completed

    with tqdm(total=len(futures), desc=desc, unit=unit, disable=not progress) as bar:
        for _ in as_completed(futures):
            bar.update()
    return client.gather(futures)
