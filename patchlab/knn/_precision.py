"""Reduced-precision fast passes: how far their distances can be off, the pool that bound asks
for, and where they pay.

The fast pass of the ``torch`` backend ranks candidates by GEMM-form squared distances of the
centred features (:mod:`patchlab.knn._gemm`); :mod:`patchlab.knn._exact` then ranks them
exactly and certifies each row with a bound on the fast pass's error,

    |d2_fast(f, m) - d2(f, m)| <= c_x ||f|| ||m|| + c_n (||f||^2 + ||m||^2)        (B)

(||.|| of the centred features). With u the unit roundoff of the inputs' format and
g = d u32 / (1 - d u32) the bound of a float32 sum of d products:

- ``fp32``: c_x = 0, c_n = 2 (d + 3) eps32 (dot product, norms and the additions, all float32).
- ``bf16``: the features rounded to bfloat16 (u = 2^-8: |f~_i - f_i| <= u |f_i|), their dot
  product summed in float32 (exact products: 8 + 8 significant bits) and rounded to bfloat16,
  then ||m||^2 - 2 <f~, m~> + ||f||^2 formed in float32:

      |<f~, m~> - <f, m>| <= (2u + u^2) ||f|| ||m||          (Cauchy-Schwarz on the roundings)
      float32 sum:          <= g (1 + u)^2 ||f|| ||m||
      bfloat16 output:      <= u (1 + u)^2 (1 + g) ||f|| ||m||

  so c_x = 2 ((2u + u^2) + g (1 + u)^2 + u (1 + u)^2 (1 + g)) (the factor 2 of -2 <f, m>)
  and c_n as for fp32 (norms and additions). This assumes what oneDNN's AVX512-BF16 and AMX
  kernels and cuBLAS do: products summed in float32, never in bfloat16.

A row is certain when the fast distance T of its last candidate satisfies
T - err(f, m) > D_k for every bank feature m that could be nearer than D_k (the exact k-th
distance among the candidates): see :func:`patchlab.knn._exact.uncertain_rows`. The pool of a
bf16 pass is sized from (B) on a sample of rows (:func:`bf16_pool`); a row the bound cannot
certify is searched again in float64, so the table is exact whatever the pool.
"""

from __future__ import annotations

import time
from functools import cache

import torch

U32 = 2.0**-24  # float32 unit roundoff (eps32 / 2)
U_BF16 = 2.0**-8  # bfloat16: 8 significant bits
CALIBRATION_SPEEDUP = 1.5  # auto picks bf16 where its GEMM measured at least this much faster
MIN_BANK = 20_000  # ... and for banks of at least this many rows (smaller: seconds at most)


def error_coefficients(precision: str, d: int) -> tuple[float, float]:
    """(c_x, c_n) of bound (B) for a fast pass in ``precision`` at width d."""
    c_n = 2 * (d + 3) * 2 * U32
    if precision == "fp32":
        return 0.0, c_n
    if precision == "bf16":
        u, g = U_BF16, d * U32 / (1 - d * U32)
        c_x = 2 * ((2 * u + u * u) + g * (1 + u) ** 2 + u * (1 + u) ** 2 * (1 + g))
        return c_x, c_n
    raise ValueError(f"no error bound for precision {precision!r}")


def bf16_block(qa: torch.Tensor, bb: torch.Tensor, b_norm: torch.Tensor, out=None) -> torch.Tensor:
    """||m||^2 - 2 <f~, m~> (float32) of a block: the bf16 fast pass's GEMM form.

    Parameters
    ----------
    qa, bb : torch.Tensor, shape (r, d) and (c, d), bfloat16
        Centred query and bank rows, rounded to bfloat16.
    b_norm : torch.Tensor, shape (c,), float32
        ||m||^2 of the bank rows (float32, from the unrounded features).
    out : torch.Tensor, shape (r, c), float32, optional
    """
    dot = torch.mm(qa, bb.T)  # float32 sums, rounded to bfloat16 (CPU and CUDA alike)
    return torch.add(b_norm[None, :], dot, alpha=-2.0, out=out)


def bf16_pool(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    sample: int = 256,
    quantile: float = 0.99,
    seed: int = 0,
) -> int:
    """Extra candidates a bf16 pass keeps per row: enough to certify ``quantile`` of a sample.

    For a sampled row f, with F_k its k-th smallest fast distance, the true k-th distance is at
    most F_k + err and every fast distance above F_k + 2 err is certified out, so the row needs
    #{m : d2_fast(f, m) <= F_k + 2 err} - k extra candidates (err from bound (B) with ||m||
    up to ||f|| + sqrt(F_k + err), the farthest a nearer neighbour can lie). Rows needing more
    than the pool are searched again exactly, so the sample only sets the cost.

    Parameters
    ----------
    queries, bank : torch.Tensor, shape (n, d) and (m, d), float
    k : int

    Returns
    -------
    int, between 8 and 8 k.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(queries.shape[0], generator=gen)[:sample].to(queries.device)
    mean = bank.float().mean(0, keepdim=True)
    f = queries[rows].float() - mean
    f_sq = (f * f).sum(1)
    cap = min(8 * k, bank.shape[0] - k - 1)
    if cap <= 8:
        return max(cap, 0)
    best = torch.full((len(rows), k + cap + 1), float("inf"), device=f.device)
    for s in range(0, bank.shape[0], 8192):  # the sample's fast distances, a block at a time
        m = bank[s : s + 8192].float() - mean
        d2 = bf16_block(f.bfloat16(), m.bfloat16(), (m * m).sum(1)) + f_sq[:, None]
        best = torch.cat([best, d2], 1).topk(best.shape[1], dim=1, largest=False).values
    best = best[:, 1:]  # drop each row's smallest: the row itself when the bank holds it
    c_x, c_n = error_coefficients("bf16", bank.shape[1])
    f_k = best[:, k - 1].clamp_min(0).double()
    f_sq = f_sq.double()
    err = torch.zeros_like(f_k)
    for _ in range(2):  # reach from F_k, then from F_k + err (a nearer neighbour's farthest)
        reach = f_sq.sqrt() + (f_k + err).sqrt()
        err = c_x * f_sq.sqrt() * reach + c_n * (f_sq + reach**2)
    need = (best.double() <= (f_k + 2 * err)[:, None]).sum(1) - k
    return int(min(cap, max(8, torch.quantile(need.double(), quantile).ceil())))


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@cache
def bf16_speedup(d: int, rows: int = 2048, cols: int = 4096) -> float:
    """Measured GEMM throughput of bf16 over float32 on this CPU at width d (best of 3 each;
    once per process and width)."""
    a, b = torch.randn(rows, d), torch.randn(cols, d)
    norm = torch.zeros(cols)
    out = torch.empty(rows, cols)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    fp32 = best(lambda: torch.addmm(norm[None], a, b.T, alpha=-2.0, out=out))
    a16, b16 = a.bfloat16(), b.bfloat16()
    bf16 = best(lambda: bf16_block(a16, b16, norm, out=out))
    return fp32 / bf16


def bf16_pays(device: torch.device, n_bank: int, d: int) -> bool:
    """Whether ``precision="auto"`` takes the bf16 pass: on a CPU with bf16 instructions whose
    bf16 GEMM measured at least :data:`CALIBRATION_SPEEDUP` times the float32 one, for a bank
    of at least :data:`MIN_BANK` rows. CUDA keeps float32 (bf16 was not measured faster there
    on real features)."""
    if device.type != "cpu" or n_bank < MIN_BANK or not cpu_has_bf16():
        return False
    return bf16_speedup(d) >= CALIBRATION_SPEEDUP
