"""Features and neighbour tables on a Dask LocalCluster (2 worker processes): the same as local.

Compared with the local path bit for bit: every exclusion mode, a separate bank with ids (the
coreset's case), exact ties, a whole ``patchlab run`` (metrics.json, maps.npz, the cache entry),
and a worker killed in the middle of the neighbour step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import torch

distributed = pytest.importorskip("distributed", reason="pip install 'patchlab[dask]'")

from patchlab.cli import main  # noqa: E402
from patchlab.distributed import connect, knn_on_cluster, local_cluster  # noqa: E402
from patchlab.knn import knn  # noqa: E402


@pytest.fixture(scope="module")
def client():
    cluster = local_cluster(2)  # what --scheduler local starts, with 2 workers
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def same(a, b) -> None:
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.distances, b.distances)
    assert a.exclude == b.exclude


@pytest.mark.parametrize("exclude", ["self", "image", "nearest", "none"])
def test_self_knn_equals_the_local_one(client, exclude):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 24, generator=gen)
    x[1500:1600] = x[:100]  # exact duplicates: ties, broken by index in both paths
    groups = torch.arange(30).repeat_interleave(100)
    kw = dict(exclude=exclude, query_groups=groups if exclude == "image" else None)
    local = knn(x, 7, progress=False, **kw)
    spread = knn_on_cluster(client, x, 7, strip_rows=400, progress=False, **kw)
    same(local, spread)


def test_separate_bank_with_ids_equals_the_local_one(client):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2000, 16, generator=gen)
    rows = torch.randperm(2000, generator=gen)[:500]  # a "coreset": bank rows keep their ids
    groups = torch.arange(20).repeat_interleave(100)
    kw = dict(
        query_ids=torch.arange(2000), bank_ids=rows, query_groups=groups, bank_groups=groups[rows]
    )
    for exclude in ("self", "image"):
        local = knn(x, 5, x[rows], exclude=exclude, progress=False, **kw)
        spread = knn_on_cluster(
            client, x, 5, x[rows], exclude=exclude, strip_rows=300, progress=False, **kw
        )
        same(local, spread)


def test_bad_arguments_are_the_local_errors(client):
    x = torch.randn(50, 4)
    with pytest.raises(ValueError, match="k=60 is larger than the bank allows"):
        knn_on_cluster(client, x, 60, progress=False)
    with pytest.raises(ValueError, match="strip_rows"):
        knn_on_cluster(client, x, 3, strip_rows=0, progress=False)


def test_run_with_a_local_cluster_equals_the_local_run(tiny_demo, tmp_path):
    """Bit for bit, with the local run on one thread as each worker is: oneDNN's convolutions
    sum in an order that depends on the thread count, so features computed with 2 threads
    differ from 1-thread ones by float32 rounding (up to 9e-6 here), and so do the metrics."""
    args = ["run", str(tiny_demo), "--category", "brick", "--k", "5", "--quiet"]
    threads = torch.get_num_threads()
    for name, extra in (("local", []), ("dask", ["--scheduler", "local"])):
        # separate caches: each path computes its own features and table
        torch.set_num_threads(1)
        try:
            code = main(
                [
                    *args,
                    *extra,
                    "--cache-dir",
                    str(tmp_path / f"cache-{name}"),
                    "--out",
                    str(tmp_path / name),
                ]
            )
        finally:
            torch.set_num_threads(threads)
        assert code == 0
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("local", "dask"))
    for key in ("image_auroc", "pixel_auroc", "pro", "image_auroc_by_score", "n_patches"):
        assert one[key] == two[key], key
    assert two["config"]["scheduler"] == "local"
    with (
        np.load(tmp_path / "local" / "maps.npz") as a,
        np.load(tmp_path / "dask" / "maps.npz") as b,
    ):
        for key in ("maps", "image_scores", "shown", "shown_images"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # the same cache entries (names: keys without the scheduler; contents: equal)
    names = [sorted(p.name for p in (tmp_path / f"cache-{n}").iterdir()) for n in ("local", "dask")]
    assert names[0] == names[1]
    for name in names[0]:
        if name.endswith(".npy"):
            np.testing.assert_array_equal(
                np.load(tmp_path / "cache-local" / name), np.load(tmp_path / "cache-dask" / name)
            )


def test_no_scheduler_at_the_address_is_a_clear_error(tmp_path, capsys, tiny_demo):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(
        [
            "run",
            str(tiny_demo),
            "--category",
            "brick",
            "--quiet",
            "--scheduler",
            f"tcp://127.0.0.1:{port}",
            "--cache-dir",
            str(tmp_path / "c"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"tcp://127.0.0.1:{port}" in err and "--scheduler local" in err


def test_without_dask_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r"patchlab\[dask\]"):
        connect("tcp://127.0.0.1:1")


def test_a_worker_killed_during_the_neighbour_step(client):
    """SIGKILL to a worker running a strip: Dask runs its tasks again elsewhere (the nanny
    starts a new worker); the table is still the local one."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24000, 32, generator=gen)
    local = knn(x, 10, progress=False)
    n_strips = 40
    out: dict = {}
    thread = threading.Thread(
        target=lambda: out.update(
            table=knn_on_cluster(client, x, 10, strip_rows=24000 // n_strips, progress=False)
        )
    )
    pids = client.run(os.getpid)
    thread.start()

    def strips(dask_scheduler) -> dict:
        tasks = [t for k, t in dask_scheduler.tasks.items() if str(k).startswith("_knn_task")]
        running = {t.processing_on.address for t in tasks if t.processing_on is not None}
        return {"done": sum(t.state == "memory" for t in tasks), "running_on": sorted(running)}

    deadline = time.monotonic() + 300
    while (state := client.run_on_scheduler(strips))["done"] < 1 or not state["running_on"]:
        assert time.monotonic() < deadline, "no strip finished within 5 minutes"
        time.sleep(0.05)
    victim = state["running_on"][0]
    os.kill(pids[victim], signal.SIGKILL)
    killed_at = state["done"]
    thread.join(600)
    assert not thread.is_alive()
    assert killed_at < n_strips  # the kill fell in the middle of the step
    same(local, out["table"])
    # the killed process is gone; the cluster still has two workers (the nanny restarted one)
    client.wait_for_workers(2, timeout=120)
    assert pids[victim] not in client.run(os.getpid).values()
