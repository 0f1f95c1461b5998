"""The memory bank and the neighbour table of every patch against it, cached.

    memory bank M = every patch of the set (blind), or of another image set (one-class),
                    or a greedy coreset of those (PatchCore's approximate k-centre)
    table         = the k_max nearest bank entries of every patch, the patch itself excluded
                    (:mod:`patchlab.knn`), computed once and sliced for any K <= k_max

:func:`build_bank` makes the :class:`MemoryBank`, :func:`neighbour_table` the table. Both go
through :mod:`patchlab.cache` (greedy picks and tables are prefix-complete: a longer cached
entry serves a shorter request).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from patchlab.cache import (
    atomic_save,
    cache_folder,
    coreset_stem,
    neighbour_stem,
    read_through,
    resolve_device,
)
from patchlab.coreset import greedy_coreset
from patchlab.knn import Neighbours, knn

if TYPE_CHECKING:
    from patchlab.config import RunConfig


@dataclass(frozen=True)
class MemoryBank:
    """The memory bank M: the patch features every patch of the set is compared with.

    Attributes
    ----------
    source : torch.Tensor, shape (n_s, h, w, d)
        Patch features of the images the bank is drawn from: the set itself (``blind``) or
        another image set (one-class: train/good).
    rows : torch.Tensor, shape (m,), int64, or None
        The patches of ``source`` (flattened, image-major) that form the bank: a coreset;
        None when every patch does.
    blind : bool
        True when the source is the set itself: a patch is then in the bank, and the
        exclusions (``self``, ``nearest``, ``image``) apply.
    key : str
        The cache key of the source features (:func:`patchlab.cache.feature_key`).
    """

    source: torch.Tensor
    rows: torch.Tensor | None
    blind: bool
    key: str

    @property
    def features(self) -> torch.Tensor:
        """The bank's entries, (m, d): row j of the neighbour table's indices is entry j."""
        flat = self.source.reshape(-1, self.source.shape[-1])
        return flat if self.rows is None else flat[self.rows.to(flat.device)]

    @property
    def ids(self) -> torch.Tensor:
        """(m,) int64: each entry's patch index in the source (:attr:`rows`, or positions)."""
        n = self.source[..., 0].numel()
        return torch.arange(n) if self.rows is None else self.rows.cpu()

    @property
    def groups(self) -> torch.Tensor:
        """(m,) int64: the source image of each entry."""
        return self.ids // (self.source.shape[1] * self.source.shape[2])

    def __len__(self) -> int:
        return self.source[..., 0].numel() if self.rows is None else len(self.rows)

    def position(self, entry: int) -> tuple[int, int, int]:
        """(image, grid row, grid column) in the source of bank entry ``entry``."""
        h, w = self.source.shape[1:3]
        i, p = divmod(int(self.ids[entry]), h * w)
        return i, p // w, p % w


def build_bank(
    source: torch.Tensor, key: str, config: RunConfig, blind: bool, progress: bool = True
) -> MemoryBank:
    """The memory bank of ``source`` (n_s, h, w, d): every patch, or the greedy coreset of
    ``config.coreset`` of them (:func:`coreset_rows`, cached under ``key``)."""
    rows = None
    if config.coreset < 1:
        rows = coreset_rows(source.reshape(-1, source.shape[-1]), key, config, progress)
    bank = MemoryBank(source, rows, blind, key)
    _check_bank_size(config, len(bank))
    return bank


def neighbour_table(
    features: torch.Tensor,
    key: str,
    bank: MemoryBank,
    config: RunConfig,
    progress: bool = True,
) -> Neighbours:
    """The (n * h * w, k_max) table of every patch of ``features`` (n, h, w, d), the set
    named ``key``, against ``bank``, cached. A cached table computed for a larger k_max is
    sliced rather than recomputed."""
    folder, need = cache_folder(config.cache_dir), config.table_k
    # a bank drawn from other features than the queries' (one-class, a saved bank) is named
    stem = neighbour_stem(key, config.exclude, bank.rows, None if bank.key == key else bank.key)
    n_rows, n_bank = features[..., 0].numel(), len(bank)

    def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
        with np.load(path) as z:
            return z["distances"][:, :need], z["indices"][:, :need]

    def complete(table) -> bool:
        d, i = table
        return d.shape == i.shape == (n_rows, need) and int(i.max(initial=0)) < n_bank
        # (a broken file raises while loading; read_entry removes it either way)

    def compute() -> tuple[np.ndarray, np.ndarray]:
        table = _search(features, bank, config, progress)
        return table.distances.numpy(), table.indices.numpy()

    def save(path: Path, table: tuple[np.ndarray, np.ndarray]) -> None:
        atomic_save(path, distances=table[0], indices=table[1].astype(np.int32))

    distances, indices = read_through(folder, stem, load, complete, compute, save, ("k", need))
    distances = torch.from_numpy(np.ascontiguousarray(distances))
    indices = torch.from_numpy(indices.astype(np.int64))
    return Neighbours(distances, indices, config.exclude if bank.blind else "none")


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


def _search(features: torch.Tensor, bank: MemoryBank, config: RunConfig, progress) -> Neighbours:
    """The kNN of every patch of ``features`` against ``bank``: one call of the one kNN (a
    self-kNN with symmetric blocks when the bank is the whole set)."""
    n, h, w, d = features.shape
    queries = features.reshape(n * h * w, d)
    exclude = config.exclude if bank.blind else "none"  # no query is in another set's bank
    kw: dict = dict(exclude=exclude, engine=config.engine(), progress=progress)
    search = knn
    if config.scheduler is not None:  # the same search, in row strips on a Dask cluster
        from patchlab.distributed import connect, knn_on_cluster

        search = partial(knn_on_cluster, connect(config.scheduler))
    groups = torch.arange(n).repeat_interleave(h * w)
    if not bank.blind:  # one-class: the bank is another image set, nothing to exclude
        table = search(queries, config.table_k, bank.features, **kw)
    elif bank.rows is None:  # the self-kNN: symmetric blocks
        table = search(queries, config.table_k, query_groups=groups, **kw)
    else:  # a coreset of the set's own patches: rows keep their patch identity
        keys = dict(query_ids=torch.arange(n * h * w), bank_ids=bank.ids)
        keys |= dict(query_groups=groups, bank_groups=bank.groups)
        table = search(queries, config.table_k, bank.features, **keys, **kw)
    return Neighbours(table.distances.cpu(), table.indices.cpu(), exclude)


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
