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
scheduler: from the same features a table is the local one bit for bit, and features equal a
local run's to float32 rounding (oneDNN sums in an order that depends on the thread count and
the buffers' alignment), as two local runs with other thread counts do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from patchlab.backbones import weights_identity
from patchlab.knn import Engine, Neighbours, check_arguments, knn
from patchlab.malloc import MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD

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
    except ImportError:  # a RuntimeError: the CLI prints it as one line
        raise RuntimeError(
            "--scheduler needs Dask: pip install 'patchlab[dask]' (dask[distributed])"
        ) from None
    client = _CLIENTS.get(scheduler)
    if client is not None and client.status == "running":
        return client
    if scheduler == "local":
        with _ctrl_c_ignored():  # the workers inherit it: Ctrl-C reaches only this process
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
# get the CLI's thresholds instead (patchlab.malloc.tune_malloc).
WORKER_ENV = {
    "MALLOC_TRIM_THRESHOLD_": str(MALLOC_TRIM_THRESHOLD),
    "MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD),
}


def local_cluster(n_workers: int | None = None):
    """A ``distributed.LocalCluster`` of ``n_workers`` (default: one per usable core)
    single-threaded worker processes, listening on 127.0.0.1 only (dashboard on a free port),
    with :data:`WORKER_ENV`."""
    import dask
    from distributed import LocalCluster

    # glibc reads these when a process starts: the nanny's pre-spawn environment, not `env`
    spawn = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENV.items()}
    with dask.config.set(spawn):
        return LocalCluster(
            n_workers=n_workers or _usable_cores(),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            preload=["patchlab.distributed"],  # dask_setup below, in each worker process
            # the workers' warnings stay quiet (a task cancelled by Ctrl-C printed one); their
            # errors are shown, and a failed task's exception reaches the caller anyway
            silence_logs=logging.ERROR,
        )


def dask_setup(worker) -> None:
    """Run by Dask in each worker process of :func:`local_cluster` as it starts (a preload).

    The workers share the terminal's process group, so Ctrl-C reaches them too: each printed
    its own traceback (70-96 lines after the CLI's one-line message). They ignore it instead;
    the process the user started handles Ctrl-C and closes the cluster (:func:`close_all`)."""
    if threading.current_thread() is threading.main_thread():  # signal's own requirement
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _ctrl_c_ignored():
    """SIGINT ignored while the block runs (in the main thread; elsewhere nothing changes).

    Processes started meanwhile inherit the ignored signal (a blocked one does not survive
    multiprocessing's spawn), so the workers' start-up imports do not each print a
    traceback when the user presses Ctrl-C; a Ctrl-C in these seconds is lost, the next one
    stops the run. A worker the nanny starts later ignores it through :func:`dask_setup`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _usable_cores() -> int:
    """The cores this process may run on (its affinity; a container's limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
    local: int = 3,
    progress: bool = True,
) -> torch.Tensor:
    """Features of ``paths`` (see :func:`patchlab.features.extract_features`), one task per
    batch of ``batch_size`` images; in the images' order, float32 on the CPU.

    ``forward`` is :func:`patchlab.features.forward` (passed in, so that this module does not
    import the features module that calls it); each worker runs it on its batches with its
    own copy of the backbone."""
    # absolute paths: a worker may run in another folder (a file system it shares)
    paths = [Path(p).resolve() for p in paths]
    if str(weights) not in ("imagenet", "none"):
        weights = Path(weights).resolve()
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    # a worker keeps its backbone under the weights' identity (a file's hash): an edited
    # weights file at the same path gets a new backbone, never the old one's features
    model = (backbone, str(weights), seed, device, weights_identity(backbone, weights, seed))
    futures = client.map(
        _features_task,
        chunks,
        forward=forward,
        model=model,
        kind=kind,
        resize=resize,
        crop=crop,
        local=local,
        pure=False,
    )
    parts = _gather(client, futures, f"{kind} features (dask)", "batch", progress)
    return torch.from_numpy(np.concatenate(parts))


def _features_task(paths, *, forward, model, kind, resize, crop, local=3) -> np.ndarray:
    """On a worker: one batch's features, with the worker's own copy of the backbone."""
    from patchlab.backbones import build_backbone
    from patchlab.cache import resolve_device

    if model not in _MODELS:
        backbone, weights, seed, device, _ = model
        _MODELS[model] = build_backbone(backbone, weights, seed).to(resolve_device(device))
    return forward(paths, _MODELS[model], kind, resize, crop, len(paths), False, local).numpy()


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

    Same parameters, checks and result as :func:`~patchlab.knn.knn` (a self-kNN when ``bank``
    is None), plus ``strip_rows``, the queries per task. Every worker receives the bank side
    once (the bank, or for a self-kNN the queries, and its keys); a task receives its strip
    (for a self-kNN only its row range) and searches the whole bank for it with the strip's
    own ids and groups, so the exclusions are the local ones.
    """
    if strip_rows < 1:
        raise ValueError(f"strip_rows must be >= 1, got {strip_rows}")
    symmetric = bank is None
    queries, bank, ids, groups = check_arguments(
        queries, k, bank, exclude, query_ids, bank_ids, query_groups, bank_groups
    )
    n = len(queries)
    # (query key, bank key) pairs as resolved by the checks (self-kNN ids default to positions)
    query_side = {"features": queries, "ids": ids[0], "groups": groups[0]}
    bank_side = query_side if symmetric else {"features": bank, "ids": ids[1], "groups": groups[1]}
    shared = _scatter(client, bank_side, broadcast=True)
    futures = []
    for start in range(0, n, strip_rows):
        rows = (start, min(start + strip_rows, n))
        strip = rows if symmetric else _scatter(client, _rows(query_side, *rows))
        futures.append(client.submit(_knn_task, strip, shared, k, exclude, engine, pure=False))
    parts = _gather(client, futures, "neighbours (dask)", "strip", progress)
    distances = torch.from_numpy(np.concatenate([d for d, _ in parts]))
    indices = torch.from_numpy(np.concatenate([i for _, i in parts]))
    return Neighbours(distances, indices, exclude)


def _scatter(client, arrays: dict, broadcast: bool = False) -> dict:
    """The arrays of ``arrays`` (None left out) sent to the cluster; their futures."""
    return {
        name: client.scatter(a.detach().cpu().numpy(), broadcast=broadcast, hash=False)
        for name, a in arrays.items()
        if a is not None
    }


def _rows(arrays: dict, start: int, stop: int) -> dict:
    return {name: None if a is None else a[start:stop] for name, a in arrays.items()}


def _knn_task(strip, bank: dict, k, exclude, engine) -> tuple[np.ndarray, np.ndarray]:
    """On a worker: the exact k nearest of one strip of queries over the whole bank.

    ``strip`` is a (start, stop) row range of the bank itself (self-kNN) or the strip's own
    arrays; ``bank`` the bank side's arrays (features, ids, groups), as numpy."""
    if isinstance(strip, tuple):
        strip = {name: a[strip[0] : strip[1]] for name, a in bank.items()}

    def tensor(arrays: dict, name: str) -> torch.Tensor | None:
        return torch.from_numpy(arrays[name]) if name in arrays else None

    table = knn(
        tensor(strip, "features"),
        k,
        tensor(bank, "features"),
        exclude=exclude,
        query_ids=tensor(strip, "ids"),
        bank_ids=tensor(bank, "ids"),
        query_groups=tensor(strip, "groups"),
        bank_groups=tensor(bank, "groups"),
        engine=engine,
        progress=False,
    )
    return table.distances.numpy(), table.indices.numpy()


def _gather(client, futures, desc: str, unit: str, progress: bool) -> list:
    """The futures' results in submission order, with a progress bar as they finish."""
    from distributed import as_completed

    with tqdm(total=len(futures), desc=desc, unit=unit, disable=not progress) as bar:
        for future in as_completed(futures):
            if future.status == "error":  # the first failed task stops the step
                for other in futures:
                    other.cancel()
                future.result()  # raises the task's own exception
            bar.update()
    return client.gather(futures)
