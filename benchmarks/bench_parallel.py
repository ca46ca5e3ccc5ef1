"""Scaling of skdkvb.parallel.fit_parallel over 1 and 2 single-thread Dask worker processes.

Reports, per worker count: wall time of fit_parallel (keys are fitted beforehand, outside the
timing), speed-up over 1 worker, bytes moved between workers (``transfer_outgoing_bytes_total``
summed over workers: the models going up the merge tree plus any partition fetched from another
worker), and the test accuracy (identical for every worker count with ``decoder="logp"``).

Paper size (the lead's full run; 1M rows x 256 features, 256 heads x 4096 keys x 14):

    python benchmarks/bench_parallel.py --data synthetic --n 1000000 --n-features 256 \\
        --n-heads 256 --n-keys 4096 --key-dim 14 --partitions 32 --workers 1 2

Fashion-MNIST (``dataset-fashion-mnist`` files, see skdkvb.continual.datasets):

    python benchmarks/bench_parallel.py --data fashion --n-heads 256 --n-keys 4096 --key-dim 14 --workers 1 2

Timings on a loaded, shared machine are meaningless; compare only ratios from the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _data(args):
    if args.data == "fashion":
        from skdkvb.continual.datasets import load_fashion_mnist

        d = load_fashion_mnist(n_train=args.n, n_test=args.n_test)
        return (d.X_train / 255.0).astype(np.float32), d.y_train, (d.X_test / 255.0).astype(np.float32), d.y_test
    rng = np.random.default_rng(0)
    n = args.n + args.n_test
    centers = rng.normal(size=(args.n_classes, args.n_features)).astype(np.float32)
    y = rng.integers(0, args.n_classes, n)
    X = centers[y] + rng.normal(scale=2.0, size=(n, args.n_features)).astype(np.float32)
    return X[: args.n], y[: args.n], X[args.n :], y[args.n :]


def _torch_one_thread():
    import torch

    torch.set_num_threads(1)


def _outgoing(dask_worker):
    return int(getattr(dask_worker, "transfer_outgoing_bytes_total", 0))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["synthetic", "fashion"], default="synthetic")
    p.add_argument("--n", type=int, default=20_000, help="training rows")
    p.add_argument("--n-test", type=int, default=2_000)
    p.add_argument("--n-features", type=int, default=256)
    p.add_argument("--n-classes", type=int, default=10)
    p.add_argument("--n-heads", type=int, default=64)
    p.add_argument("--n-keys", type=int, default=1024)
    p.add_argument("--key-dim", type=int, default=14)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)

    import dask.array as da
    from distributed import Client, LocalCluster

    from skdkvb import DKVBClassifier
    from skdkvb.parallel import fit_parallel

    _torch_one_thread()
    X, y, X_test, y_test = _data(args)
    start = DKVBClassifier(
        n_heads=args.n_heads,
        n_keys=args.n_keys,
        key_dim=args.key_dim,
        decoder="logp",
        random_state=0,
        device="cpu",
    ).fit_keys(X[: min(len(X), 20 * args.n_keys)])
    chunk = -(-len(X) // args.partitions)
    rows = []
    for n_workers in args.workers:
        with (
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                worker_dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            client.run(_torch_one_thread)
            client.wait_for_workers(n_workers)
            Xd = da.from_array(X, chunks=(chunk, X.shape[1])).persist()  # on the workers before the clock
            yd = da.from_array(y, chunks=(chunk,)).persist()
            before = sum(client.run(_outgoing).values())
            t0 = time.perf_counter()
            model = fit_parallel(start, Xd, yd, client=client)
            wall = time.perf_counter() - t0
            moved = sum(client.run(_outgoing).values()) - before
        rows.append(
            {
                "workers": n_workers,
                "wall_s": round(wall, 2),
                "bytes_between_workers": moved,
                "test_accuracy": round(float(model.score(X_test, y_test)), 4),
            }
        )
    base = rows[0]["wall_s"]
    for r in rows:
        r["speedup"] = round(base / r["wall_s"], 2)
        print(json.dumps(r))
    b = model.bottleneck_
    table_bytes = b.values.numel() * b.values.element_size() + b.counts.numel() * b.counts.element_size()
    print(json.dumps({"config": vars(args), "model_tables_bytes": int(table_bytes)}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
