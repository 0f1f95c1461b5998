"""Features and neighbour tables on a Dask LocalCluster (2 worker processes): the same as local.

Tables are compared with the local path bit for bit: every exclusion mode, a separate bank with
ids (the coreset's case), exact ties, a whole ``patchlab run`` (metrics.json, maps.npz, the
cache entries), a worker killed in the middle of the neighbour step. Features are compared to
float32 rounding (see the run test).
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
    cases = [
        (dict(k=60), "k=60 is larger than the bank allows"),
        (dict(k=3, queries=np.zeros((0, 4))), "non-empty 2-D"),
        (dict(k=3, bank_ids=torch.arange(50)), "self-kNN"),
        (dict(k=3, exclude="image"), "query_groups"),
    ]
    for kw, message in cases:
        kw = {"queries": x, **kw}
        with pytest.raises(ValueError, match=message):  # knn's own message, locally...
            knn(progress=False, **kw)
        with pytest.raises(ValueError, match=message):  # ...and before anything is sent
            knn_on_cluster(client, progress=False, **kw)
    # numpy input is accepted, as by knn
    same(knn(x.numpy(), 3, progress=False), knn_on_cluster(client, x.numpy(), 3, progress=False))
    with pytest.raises(ValueError, match="strip_rows"):
        knn_on_cluster(client, x, 3, strip_rows=0, progress=False)


def test_run_with_a_local_cluster_equals_the_local_run(tiny_demo, tmp_path):
    """``--scheduler local`` against a local run. From the same features (the local run's,
    in the cache) the table, metrics and maps are equal bit for bit. Features computed on the
    cluster equal the local ones to float32 rounding only: oneDNN's convolutions sum in an
    order that depends on the thread count and on the buffers' alignment."""
    args = ["run", str(tiny_demo), "--category", "brick", "--k", "5", "--quiet"]
    args += ["--method", "patchcluster", "--local-sizes", "3", "--rscin"]  # the paper's, a table

    def run(name: str, *extra: str) -> tuple[dict, dict]:
        out = tmp_path / name
        code = main(
            [*args, *extra, "--cache-dir", str(tmp_path / f"cache-{name}"), "--out", str(out)]
        )
        assert code == 0
        with np.load(out / "maps.npz") as z:
            return json.loads((out / "metrics.json").read_text()), {k: z[k] for k in z.files}

    local = run("local")
    [features] = (tmp_path / "cache-local").glob("features-*.npy")
    (tmp_path / "cache-table").mkdir()  # the local features only: the table is the cluster's
    (tmp_path / "cache-table" / features.name).write_bytes(features.read_bytes())
    table = run("table", "--scheduler", "local")
    spread = run("dask", "--scheduler", "local")  # features and table on the cluster
    assert table[0]["config"]["scheduler"] == "local"
    keys = ("image_auroc", "pixel_auroc", "pro", "image_auroc_by_score", "n_patches")
    for key in keys:
        assert table[0][key] == local[0][key], key
    for key in ("maps", "image_scores", "shown", "shown_images"):
        np.testing.assert_array_equal(table[1][key], local[1][key], err_msg=key)
    [stored] = (tmp_path / "cache-local").glob("neighbours-*.npz")
    with np.load(stored) as a, np.load(tmp_path / "cache-table" / stored.name) as b:
        np.testing.assert_array_equal(a["indices"], b["indices"])
        np.testing.assert_array_equal(a["distances"], b["distances"])
    # features from the workers: the same cache entry, the same values to float32 rounding
    np.testing.assert_allclose(
        np.load(tmp_path / "cache-dask" / features.name), np.load(features), rtol=1e-4, atol=1e-5
    )
    for key in ("image_auroc", "pixel_auroc", "pro"):
        assert spread[0][key] == pytest.approx(local[0][key], abs=1e-6), key
    np.testing.assert_allclose(spread[1]["maps"], local[1]["maps"], rtol=1e-4, atol=1e-4)


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
    with pytest.raises(RuntimeError, match=r"patchlab\[dask\]"):
        connect("tcp://127.0.0.1:1")


def test_a_worker_killed_during_the_neighbour_step(client):
    """SIGKILL to a worker while it runs a strip: Dask runs that strip again on another worker
    (the nanny also starts a new process); the table is still the local one."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30000, 64, generator=gen)
    local = knn(x, 10, progress=False)
    out: dict = {}

    def work() -> None:
        try:
            out["table"] = knn_on_cluster(client, x, 10, strip_rows=500, progress=False)
        except BaseException as err:  # re-raised below, in the test's thread
            out["error"] = err

    def strips(dask_scheduler) -> dict:
        tasks = [t for k, t in dask_scheduler.tasks.items() if str(k).startswith("_knn_task")]
        running = {t.processing_on.address: t.key for t in tasks if t.processing_on is not None}
        return {"done": sum(t.state == "memory" for t in tasks), "running": running}

    pids = client.run(os.getpid)
    thread = threading.Thread(target=work)
    thread.start()
    deadline = time.monotonic() + 300
    while not ((state := client.run_on_scheduler(strips))["done"] and state["running"]):
        assert thread.is_alive(), f"the step ended before a worker could be killed: {out}"
        assert time.monotonic() < deadline, "no strip finished within 5 minutes"
        time.sleep(0.02)
    victim, key = next(iter(state["running"].items()))
    os.kill(pids[victim], signal.SIGKILL)
    thread.join(600)
    assert not thread.is_alive()
    if "error" in out:
        raise out["error"]
    same(local, out["table"])

    # the strip the killed worker was running went to "processing" again, on another worker
    def transitions(dask_scheduler) -> list:
        return [(start, finish) for k, start, finish, *_ in dask_scheduler.story(key) if k == key]

    assert sum(finish == "processing" for _, finish in client.run_on_scheduler(transitions)) >= 2
    # the killed process is gone; the cluster has two workers again (the nanny restarted one)
    client.wait_for_workers(2, timeout=120)
    assert pids[victim] not in client.run(os.getpid).values()


def test_workers_follow_a_weights_file_that_changed(client, tiny_demo, tmp_path):
    """Workers keep their backbone under the weights' identity (the file's hash), so a file
    rewritten at the same path is loaded again: the features are the new weights' ones."""
    from patchlab.backbones import build_backbone
    from patchlab.data import load_mvtec
    from patchlab.distributed import forward_on_cluster
    from patchlab.features import forward

    paths = list(load_mvtec(tiny_demo, "brick", "test").paths)
    weights = tmp_path / "lite0.pt"
    opts = dict(kind="patch", resize=256, crop=224)
    got, want = [], []
    for seed in (1, 2):
        model = build_backbone("efficientnet_lite0", "none", seed)
        torch.save(model.state_dict(), weights)
        got.append(
            forward_on_cluster(
                client,
                forward,
                paths,
                backbone="efficientnet_lite0",
                weights=weights,
                seed=0,
                batch_size=4,
                device="cpu",
                progress=False,
                **opts,
            )
        )
        want.append(forward(paths, model, batch_size=4, progress=False, **opts))
    for a, b in zip(got, want, strict=True):  # to float32 rounding (thread count, alignment)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[0], got[1], rtol=1e-2, atol=1e-3)


@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl-C of a process group: POSIX")
def test_ctrl_c_under_a_local_cluster_is_one_line(tiny_demo, tmp_path):
    """Ctrl-C reaches every process of the terminal's group, the workers too: each printed
    its own traceback (70-96 lines). Now only the CLI's one line, and exit code 130."""
    import subprocess

    command = [sys.executable, "-m", "patchlab.cli", "run", str(tiny_demo), "--category"]
    command += ["brick", "--scheduler", "local", "--batch-size", "1", "--resize", "256"]
    command += ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own group, as a terminal's foreground job
    )
    lines = []
    for line in process.stderr:  # the first task's bar: the workers are up and working
        lines.append(line)
        if "features (dask)" in line:
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            break
    lines += process.stderr.readlines()
    assert process.wait(timeout=120) == 130
    said = [x for x in "".join(lines).replace("\r", "\n").splitlines() if x.strip()]
    said = [x for x in said if "(dask)" not in x]  # the progress bars
    assert said == [
        "patchlab run: interrupted; the cache keeps what was finished, so the same command "
        "resumes from there"
    ]
