"""The memory bank and the neighbour table of every patch against it, cached.

    memory bank M = every patch of the set (blind), or of another image set (one-class),
                    or a greedy coreset of those (PatchCore's approximate k-centre)
    table         = the k_max nearest bank entries of every patch, the patch itself excluded
                    (:mod:`patchlab.knn`), computed once and sliced for any K <= k_max

Both go through :mod:`patchlab.cache` (greedy picks and tables are prefix-complete: a longer
cached entry serves a shorter request).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

from patchlab.cache import (
    atomic_save,
    cache_folder,
    coreset_stem,
    feature_key,
    neighbour_stem,
    read_through,
    resolve_device,
)
from patchlab.config import RunConfig
from patchlab.coreset import greedy_coreset
from patchlab.data import ImageSet
from patchlab.knn import Neighbours, knn


def feature_settings(config: RunConfig) -> dict:
    """The settings that name a config's features in the cache (:func:`feature_key`)."""
    return dict(
        backbone=config.backbone,
        weights=config.weights,
        seed=config.seed,
        resize=config.resize,
        crop=config.crop,
        local=config.local_sizes[0],
    )


def neighbour_table(
    images: ImageSet,
    features: torch.Tensor,
    config: RunConfig,
    progress: bool = True,
    bank_images: ImageSet | None = None,
    bank: torch.Tensor | None = None,
) -> tuple[Neighbours, torch.Tensor | None]:
    """The (n_patches, k_max) table of every patch against the memory bank, cached.

    The memory bank is every patch of the set (blind), or of ``bank`` (the features of
    ``bank_images``, one-class), or a greedy coreset of those (``config.coreset < 1``). A
    cached table computed for a larger k_max is sliced rather than recomputed.

    Returns
    -------
    (table, bank_rows): ``bank_rows`` (m,) int64 are the coreset's patch indices, or None.
    """
    options = feature_settings(config)
    key = feature_key(images.paths, **options)
    bank_key = None if bank is None else feature_key(bank_images.paths, **options)
    source = features if bank is None else bank
    pool = source.reshape(-1, source.shape[-1])
    bank_rows = None
    if config.coreset < 1:
        bank_rows = coreset_rows(pool, bank_key or key, config, progress)
    folder, need = cache_folder(config.cache_dir), config.table_k
    stem = neighbour_stem(key, config.exclude, bank_rows, bank_key)
    n_rows = features[..., 0].numel()
    n_bank = len(pool) if bank_rows is None else len(bank_rows)
    _check_bank_size(config, n_bank)

    def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
        with np.load(path) as z:
            return z["distances"][:, :need], z["indices"][:, :need]

    def complete(table) -> bool:
        d, i = table
        return d.shape == i.shape == (n_rows, need) and int(i.max(initial=0)) < n_bank
        # (a broken file raises while loading; read_entry removes it either way)

    def compute() -> tuple[np.ndarray, np.ndarray]:
        table = _search(features, pool, bank_rows, config, progress, blind=bank is None)
        return table.distances.numpy(), table.indices.numpy()

    def save(path: Path, table: tuple[np.ndarray, np.ndarray]) -> None:
        atomic_save(path, distances=table[0], indices=table[1].astype(np.int32))

    distances, indices = read_through(folder, stem, load, complete, compute, save, ("k", need))
    distances = torch.from_numpy(np.ascontiguousarray(distances))
    indices = torch.from_numpy(indices.astype(np.int64))
    return Neighbours(distances, indices, config.exclude), bank_rows


def _check_bank_size(config: RunConfig, n_bank: int) -> None:
    """A clear error when a coreset leaves too few patches for the table (the kNN's own error
    would not name the coreset)."""
    if config.coreset == 1 or n_bank > config.table_k:
        return
    raise ValueError(
        f"--coreset {config.coreset} keeps {n_bank} patch features, too few for a neighbour "
        f"table of k_max={config.table_k} (plus the excluded ones); raise --coreset or lower "
        "--k / --k-max"
    )


def _search(features, pool, bank_rows, config, progress, blind) -> Neighbours:
    """The kNN of every patch of ``features`` against ``pool`` (or its ``bank_rows``)."""
    n, h, w, d = features.shape
    queries = features.reshape(n * h * w, d)
    groups = torch.arange(n).repeat_interleave(h * w)
    kw: dict = dict(exclude=config.exclude, engine=config.engine(), progress=progress)
    need = config.table_k
    search = knn
    if config.scheduler is not None:  # the same search, in row strips on a Dask cluster
        from patchlab.distributed import connect, knn_on_cluster

        search = partial(knn_on_cluster, connect(config.scheduler))
    if blind and bank_rows is None:  # the self-kNN: symmetric blocks
        table = search(queries, need, query_groups=groups, **kw)
    elif blind:  # a coreset of the set's own patches: rows keep their patch identity
        table = search(
            queries,
            need,
            pool[bank_rows.to(pool.device)],
            query_ids=torch.arange(n * h * w),
            bank_ids=bank_rows,
            query_groups=groups,
            bank_groups=groups[bank_rows],
            **kw,
        )
    else:  # one-class: the bank is another image set, nothing to exclude
        bank = pool if bank_rows is None else pool[bank_rows.to(pool.device)]
        table = search(queries, need, bank, **kw)
    return Neighbours(table.distances.cpu(), table.indices.cpu(), config.exclude)


def coreset_rows(
    pool: torch.Tensor, key: str, config: RunConfig, progress: bool = True
) -> torch.Tensor:
    """Greedy coreset rows of ``pool`` (m, d), the features named ``key``, cached.

    Greedy picks come in a fixed order for a given seed, so a smaller ratio is a prefix of a
    larger one: a cached longer sequence is cut, not redone.
    """
    m = max(1, int(pool.shape[0] * config.coreset))
    device = resolve_device(config.device)
    folder = cache_folder(config.cache_dir)
    stem = coreset_stem(key, config.seed, device)

    def valid(rows: np.ndarray) -> bool:
        return rows.ndim == 1 and len(rows) >= m and 0 <= rows.min() and rows.max() < len(pool)

    def compute() -> np.ndarray:
        picks = greedy_coreset(pool.to(device), config.coreset, seed=config.seed, progress=progress)
        return picks.cpu().numpy()

    def save(path: Path, picks: np.ndarray) -> None:
        atomic_save(path, rows=picks)

    rows = read_through(folder, stem, np.load, valid, compute, save, ("m", m))
    return torch.from_numpy(rows[:m].astype(np.int64))
