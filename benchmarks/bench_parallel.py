"""Scaling of skdkvb.parallel.fit_parallel over 1 and 2 single-thread Dask worker processes.

The data never pass through the client: every partition is generated (synthetic set: a seeded
generator per partition) or loaded (Fashion-MNIST: each partition task reads the files and keeps
its rows) on a worker and persisted there before the clock starts; fit_parallel then trains each
shard where its partitions are. Keys are fitted beforehand on a small sample made on the client.

Reported per run (1 and 2 workers interleaved, ``--repeats`` times, each run on a fresh
``LocalCluster`` of worker processes with 1 torch thread each):

* ``wall_s``: wall time of fit_parallel (scatter of the start model, shard training, merge tree,
  gather of the summed counts, the final model built on the client);
* ``shard_s``: compute time of each training task, ``merge_s``: of the merge tasks (task stream);
  ``other_s`` = wall - slowest shard - merges: scatter, scheduling, transfers, the client's part;
* ``bytes_out_of_workers``: ``transfer_outgoing_bytes_total`` summed over the workers (shard
  results going up the merge tree, any partition fetched from another worker, and the final
  result gathered by the client); ``result_bytes``: the size of that final result (the summed
  counts); ``bytes_between_workers``: the difference;
* ``worker_cpu_s``: CPU seconds each worker process used during the fit (``time.process_time``):
  a shard whose compute time is well above its CPU time waited for a core (a loaded machine);
* ``load_before``: the 1-minute load average of the machine when the run started.

Paper size (256 heads x 4096 keys x 14, logp), synthetic 1M x 256:

    python benchmarks/bench_parallel.py --data synthetic --n 1000000 --partitions 16 --repeats 1

Fashion-MNIST (``dataset-fashion-mnist`` files, see skdkvb.continual.datasets), 60k x 784:

    python benchmarks/bench_parallel.py --data fashion --partitions 8 --repeats 2

Timings on a loaded, shared machine are noisy; compare the ratio of runs made side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _synthetic_centers(n_classes, n_features, seed):
    return np.random.default_rng([seed, 0]).normal(size=(n_classes, n_features)).astype(np.float32)


def synthetic_part(seed, index, n_rows, n_features, n_classes):
    """Rows of partition ``index`` of the synthetic set (Gaussian blobs), made where it is called."""
    centers = _synthetic_centers(n_classes, n_features, seed)
    rng = np.random.default_rng([seed, 1, index])
    y = rng.integers(0, n_classes, n_rows)
    X = centers[y] + 2.0 * rng.standard_normal((n_rows, n_features), dtype=np.float32)
    return X, y


def fashion_part(lo, hi, split="train"):
    """Rows ``[lo, hi)`` of Fashion-MNIST (pixels / 255, float32), read where it is called."""
    from skdkvb.continual.datasets import load_fashion_mnist

    d = load_fashion_mnist()
    X, y = (d.X_train, d.y_train) if split == "train" else (d.X_test, d.y_test)
    return (np.asarray(X[lo:hi], dtype=np.float32) / np.float32(255.0)), np.asarray(y[lo:hi])


def _bounds(n, parts):
    edges = np.linspace(0, n, parts + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))


def _collections(args, n_features):
    """Dask arrays whose partitions are made by tasks (nothing embedded in the graph)."""
    import dask
    import dask.array as da

    xs, ys = [], []
    for i, (lo, hi) in enumerate(_bounds(args.n, args.partitions)):
        if args.data == "fashion":
            part = dask.delayed(fashion_part, nout=2, pure=True)(lo, hi)
        else:
            part = dask.delayed(synthetic_part, nout=2, pure=True)(args.seed, i, hi - lo, n_features, args.n_classes)
        xs.append(da.from_delayed(part[0], (hi - lo, n_features), np.float32))
        ys.append(da.from_delayed(part[1], (hi - lo,), np.int64))
    return da.concatenate(xs), da.concatenate(ys)


def _client_side(args):
    """Key-fitting sample and test set, made on the client (small)."""
    if args.data == "fashion":
        X_keys, _ = fashion_part(0, min(args.n, args.keys_sample))
        X_test, y_test = fashion_part(0, args.n_test, split="test")
        return X_keys, X_test, y_test, X_keys.shape[1]
    # Other seeds than the training partitions: fresh rows of the same distribution.
    X_keys, _ = synthetic_part(args.seed, 10**9, args.keys_sample, args.n_features, args.n_classes)
    X_test, y_test = synthetic_part(args.seed, 10**9 + 1, args.n_test, args.n_features, args.n_classes)
    return X_keys, X_test, y_test, args.n_features


def _one_thread():
    """Pin torch to one thread, and import skdkvb's core now rather than inside the first timed task."""
    import torch

    import skdkvb.parallel  # noqa: F401

    torch.set_num_threads(1)
    return torch.get_num_threads()


def _cpu_seconds():
    return time.process_time()


def _outgoing(dask_worker):
    return int(getattr(dask_worker, "transfer_outgoing_bytes_total", 0))


def _run(args, n_workers, start, n_features, X_test, y_test):
    from distributed import Client, LocalCluster, get_task_stream, wait

    from skdkvb.parallel import fit_parallel

    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            worker_dashboard_address=None,
            env={"SKDKVB_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(n_workers)
        threads = set(client.run(_one_thread).values())
        t0 = time.perf_counter()
        X, y = client.persist(list(_collections(args, n_features)))
        wait([X, y])
        data_s = time.perf_counter() - t0
        before = sum(client.run(_outgoing).values())
        cpu0 = client.run(_cpu_seconds)
        load = os.getloadavg()[0]
        with get_task_stream(client) as ts:
            t0 = time.perf_counter()
            model = fit_parallel(start, X, y, client=client)
            wall = time.perf_counter() - t0
        cpu = {w: t - cpu0[w] for w, t in client.run(_cpu_seconds).items()}
        moved = sum(client.run(_outgoing).values()) - before
        stream = ts.data
    shard, merge, result_bytes = [], [], 0
    for task in stream:
        key = str(task["key"])
        compute = sum(s["stop"] - s["start"] for s in task["startstops"] if s["action"] == "compute")
        if "_count_shard" in key or "_train_shard" in key:
            shard.append(round(compute, 2))
        elif "add_shard_counts" in key or "_merge_pair" in key:
            merge.append(round(compute, 3))
    roots = [t for t in stream if "add_shard_counts" in str(t["key"]) or "_count_shard" in str(t["key"])]
    if roots:
        result_bytes = int(max(roots, key=lambda t: max(s["stop"] for s in t["startstops"]))["nbytes"])
    return {
        "workers": n_workers,
        "torch_threads_per_worker": sorted(threads),
        "rows": args.n,
        "wall_s": round(wall, 2),
        "shard_s": shard,
        "merge_s": merge,
        "other_s": round(wall - max(shard, default=0.0) - sum(merge), 2),
        "worker_cpu_s": sorted(round(v, 1) for v in cpu.values()),
        "data_on_workers_s": round(data_s, 2),
        "bytes_out_of_workers": moved,
        "result_bytes": result_bytes,
        "bytes_between_workers": max(moved - result_bytes, 0),
        "test_accuracy": round(float(model.score(X_test, y_test)), 4),
        "load_before": round(load, 2),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["synthetic", "fashion"], default="synthetic")
    p.add_argument("--n", type=int, default=None, help="training rows (default: 1M synthetic, 60000 fashion)")
    p.add_argument("--n-test", type=int, default=2_000)
    p.add_argument("--n-features", type=int, default=256)
    p.add_argument("--n-classes", type=int, default=10)
    p.add_argument("--n-heads", type=int, default=256)
    p.add_argument("--n-keys", type=int, default=4096)
    p.add_argument("--key-dim", type=int, default=14)
    p.add_argument("--decoder", choices=["logp", "vote"], default="logp")
    p.add_argument("--keys-sample", type=int, default=10_000, help="rows for fit_keys (on the client)")
    p.add_argument("--partitions", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1, help="rounds of the worker counts, interleaved")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)
    if args.n is None:
        args.n = 60_000 if args.data == "fashion" else 1_000_000

    import torch

    from skdkvb import DKVBClassifier

    torch.set_num_threads(1)
    X_keys, X_test, y_test, n_features = _client_side(args)
    t0 = time.perf_counter()
    start = DKVBClassifier(
        n_heads=args.n_heads,
        n_keys=args.n_keys,
        key_dim=args.key_dim,
        decoder=args.decoder,
        random_state=0,
        device="cpu",
    ).fit_keys(X_keys)
    print(json.dumps({"config": vars(args), "fit_keys_s": round(time.perf_counter() - t0, 1)}), flush=True)
    rows = []
    for _ in range(args.repeats):
        for n_workers in args.workers:
            row = _run(args, n_workers, start, n_features, X_test, y_test)
            rows.append(row)
            print(json.dumps(row), flush=True)
    best = {w: min(r["wall_s"] for r in rows if r["workers"] == w) for w in args.workers}
    summary = {
        "min_wall_s": best,
        f"speedup_vs_{min(args.workers)}_worker": {w: round(best[min(args.workers)] / t, 2) for w, t in best.items()},
        "load_after": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(summary), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
