"""The ``keops`` backend of :func:`patchlab.knn.knn`: a symbolic (LazyTensor) k-min reduction.

KeOps never materialises the distance matrix; it compiles one kernel per formula (g++ on the
CPU, nvrtc on CUDA) on first use and caches it on disk. The formula, for query i and bank
entry j:

    D_ij = sum_d (x_id - y_jd)^2  +  PENALTY * [id_i == id_j]  +  PENALTY * [group_i == group_j]

and ``Kmin_argKmin(k, dim=1)`` keeps the k smallest D_ij of every row, ascending. Excluded
pairs get a penalty far above any real squared distance instead of an infinity (infinities
interact badly with fast-math kernels); it never reaches the result when k leaves enough
bank entries, which :func:`patchlab.knn.knn` checks.

Set ``PATCHLAB_KEOPS_NATIVE=1`` before the first use to compile with ``-march=native`` into a
build folder of its own (faster CPU kernels, tied to this processor).
"""

from __future__ import annotations

import math
import os
import shutil

import torch
from tqdm.auto import tqdm

from patchlab.knn._common import centred

PENALTY = 1e30


def _pykeops():
    """Import pykeops, configured, or raise a clear error."""
    native = os.environ.get("PATCHLAB_KEOPS_NATIVE", "") not in ("", "0")
    if native and "keopscore" not in __import__("sys").modules:
        os.environ["CXXFLAGS"] = (os.environ.get("CXXFLAGS", "") + " -march=native").strip()
    try:
        import pykeops
        from pykeops.torch import LazyTensor
    except ImportError as err:
        raise RuntimeError(
            "backend='keops' needs PyKeOps: pip install pykeops (or patchlab[keops])"
        ) from err
    if native and os.path.basename(pykeops.get_build_folder()) != "patchlab-native":
        pykeops.set_build_folder(os.path.join(pykeops.get_build_folder(), "patchlab-native"))
    return LazyTensor


def _check_compiler(device: torch.device) -> None:
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        raise RuntimeError(
            "backend='keops' on the CPU compiles its kernels with g++, and no C++ compiler was "
            "found on PATH: install one (e.g. apt-get install g++) or use backend='torch'"
        )


def search(queries, bank, k, symmetric, ids, groups, engine, progress):
    """Squared distances (n_q, k) and indices (n_q, k) by a KeOps k-min reduction.

    The same interface as :func:`patchlab.knn._gemm.search`; ``engine.block_size`` query rows
    go to each reduction (8192 by default), ``symmetric`` changes nothing here.
    """
    block_size = engine.block_size
    device = queries.device
    _check_compiler(device)
    LazyTensor = _pykeops()

    q, b = centred(queries, bank)
    y_j = LazyTensor(b[None, :, :])
    keys = [(qk, bk) for qk, bk in (ids, groups) if qk is not None]
    for qk, bk in keys:
        if max(int(qk.max()), int(bk.max())) >= 2**24:
            raise ValueError("KeOps exclusion ids must be < 2**24 (they travel as float32)")
    key_j = [LazyTensor(bk.float().to(device)[None, :, None]) for _, bk in keys]

    step = block_size or 8192
    out_d, out_i = [], []
    starts = range(0, q.shape[0], step)
    for s in tqdm(starts, desc="neighbours (keops)", unit="block", disable=not progress):
        x_i = LazyTensor(q[s : s + step, None, :])
        d_ij = ((x_i - y_j) ** 2).sum(-1)
        for (qk, _), kj in zip(keys, key_j, strict=True):
            k_i = LazyTensor(qk[s : s + step].float().to(device)[:, None, None])
            same = 1 - (k_i - kj).abs().sign()  # 1 where the ids are equal, else 0
            d_ij = d_ij + PENALTY * same
        dist, idx = d_ij.Kmin_argKmin(k, dim=1)
        out_d.append(dist.reshape(-1, k))
        out_i.append(idx.reshape(-1, k).long())
    d2, idx = torch.cat(out_d), torch.cat(out_i)
    d2[d2 >= PENALTY / 2] = math.inf
    return d2, idx
