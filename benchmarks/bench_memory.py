"""Peak memory of ``predict_proba`` against n: bounded by chunking, not by n.

Each n runs in a fresh subprocess: a paper-size model (C=256, M=4096, d=14,
D=784) is fitted on 2 048 samples, ``n`` random inputs are created, the
kernel's peak-RSS counter is reset (``/proc/self/clear_refs``) and
``predict_proba`` runs. Reported: peak RSS above the RSS just before the call
(inputs and model already resident), against the model's own size.

Run: ``python benchmarks/bench_memory.py [--sizes 10000 50000 200000]``.

``--tables`` instead benchmarks the growing tables of ``skdkvb._tables`` in isolation at the paper
size (256 x 4096 rows): a 1,000-class stream whose classes concentrate on a few keys per head,
then the count store's bytes, ``scores`` peak RSS on 2,000 rows, rows/s at 1,000 vs 10 classes,
``add_classes`` time, sparse-vs-dense accuracy on a 100-class stream, and the sgd value table's
growth (time and peak RSS at 1,000 classes; ``--no-values`` skips that 4 GiB part).

``--estimator`` measures the same targets end to end on :class:`~skdkvb.DKVBClassifier` at the paper
size (256 heads x 4096 keys, d 14, D = ``--features``): a class-incremental stream of ``--classes``
classes (``--per-class`` samples each, Gaussian clusters, 25 new classes per ``partial_fit``), then
the fitted tensors (``bottleneck_.nbytes()``), the peak RSS of ``predict_proba`` on 2,000 rows above the
RSS before the call, predict rows/s at 1,000 classes against a 10-class model with the same keys
(interleaved, minimum of ``--repeat``), and one ``partial_fit`` that adds a class (the bottleneck's
``add_classes`` timed inside it, and the whole call). Then the same for ``decoder="sgd"`` (values in
``--sgd-dtype``, bfloat16 by default to stay under 5 GiB: 2 GiB at 1,000 classes): adding a class
and the peak RSS of that call against the value table.
"""

from __future__ import annotations

import json
import subprocess
import sys

from _common import parser, setup, table, write_section

CHILD = r"""
import json, sys, time, numpy as np, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from skdkvb import DKVBClassifier
n, device = {n}, {device!r}
rng = np.random.RandomState(0)
clf = DKVBClassifier(256, 4096, 14, key_init="random", decoder="vote", device=device, random_state=0)
clf.fit(rng.rand(2048, 784).astype(np.float32), rng.randint(0, 10, 2048))
model = clf.bottleneck_.nbytes()
X = rng.rand(n, 784).astype(np.float32)
clf.predict_proba(X[:256])  # warm (kernel loaded, caches built)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = status("VmRSS:")
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
P = clf.predict_proba(X)
dt = time.perf_counter() - t
peak = status("VmHWM:")
out = dict(n=n, model=model, extra=peak - before, output=P.nbytes, seconds=dt)
if device == "cuda":
    out["cuda_peak"] = torch.cuda.max_memory_allocated()
print(json.dumps(out))
"""


def _status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status("VmRSS:")


def _stream(n, n_classes, n_heads, n_keys, spread, rng, noise=0.8):
    """Per-head keys (n, n_heads): class y sits near key centre[y, c] of head c, except a fraction
    ``noise`` of the (sample, head) pairs that take a uniformly random key."""
    import numpy as np

    centre = rng.randint(0, n_keys, size=(n_classes, n_heads))
    y = rng.randint(0, n_classes, size=n)
    keys = (centre[y] + rng.randint(-spread, spread + 1, size=(n, n_heads))) % n_keys
    random = rng.rand(n, n_heads) < noise
    keys[random] = rng.randint(0, n_keys, size=int(random.sum()))
    rows = keys + np.arange(n_heads) * n_keys
    return rows.astype(np.int64), y.astype(np.int64)


def tables(args):
    import time

    import numpy as np
    import torch

    from skdkvb._tables import CountTable, ValueTable

    C, M, a = 256, 4096, 0.1
    n_rows = C * M
    rng = np.random.RandomState(0)
    res = {}

    def fill(n_classes, n, layout="auto", heads=C):
        rows, y = _stream(n + 2000, n_classes, heads, M, args.spread, rng)
        t = CountTable(heads * M, n_classes, layout=layout)
        w = torch.ones(1000, dtype=torch.float64)
        for s in range(0, n, 1000):
            t.add(torch.from_numpy(rows[s : s + 1000]), torch.from_numpy(y[s : s + 1000]), w[: min(1000, n - s)])
        return t, torch.from_numpy(rows[n:]), torch.from_numpy(y[n:])

    t0 = time.perf_counter()
    big, q, qy = fill(1000, args.stream)
    res["fill 1000-class stream s"] = round(time.perf_counter() - t0, 1)
    big.scores(q[:10], "logp", a)  # builds the correction cache
    res["layout"] = big.layout
    res["nnz"] = big.nnz
    res["store+cache MiB (1000 classes)"] = round(big.nbytes() / 2**20)
    res["dense float64 would be MiB"] = round(n_rows * 1000 * 8 / 2**20)
    before = _reset_peak()
    t0 = time.perf_counter()
    s_big = big.scores(q, "logp", a)
    dt_big = time.perf_counter() - t0
    res["scores(2000) peak above pre-call MiB"] = round((_status("VmHWM:") - before) / 2**20)
    res["scores acc on held-out (1000 classes)"] = round(float((s_big.argmax(1) == qy).float().mean()), 4)
    small, q10, _ = fill(10, args.stream)
    small.scores(q10[:10], "logp", a)
    t0 = time.perf_counter()
    small.scores(q10, "logp", a)
    dt_small = time.perf_counter() - t0
    res["layout at 10 classes"] = small.layout
    res["rows/s 10 classes"] = round(2000 / dt_small)
    res["rows/s 1000 classes"] = round(2000 / dt_big)
    res["ratio 1000/10"] = round(dt_small / dt_big, 2)
    del small
    t0 = time.perf_counter()
    big.add_classes(1)
    res["add_classes(1) at 1000 ms"] = round((time.perf_counter() - t0) * 1e3, 2)
    t0 = time.perf_counter()
    big.scores(q, "logp", a)
    res["first scores after add_classes s (cache rebuild incl.)"] = round(time.perf_counter() - t0, 2)
    del big, s_big
    # 100 classes, 64 heads: the exact sparse store against dense counts (same numbers -> same accuracy)
    # few heads so that the accuracy is not trivially 1
    dense, qd, qyd = fill(100, args.stream, "dense", heads=4)
    sparse_t = CountTable(4 * M, 100, layout="sparse")
    r_, c_, v_ = dense._cells()
    sparse_t._add_cells(r_, c_, v_)
    for dec in ("logp", "vote"):
        pd, ps = dense.scores(qd, dec, a).argmax(1), sparse_t.scores(qd, dec, a).argmax(1)
        res[f"100-class {dec} acc dense/sparse"] = (
            round(float((pd == qyd).float().mean()), 4),
            round(float((ps == qyd).float().mean()), 4),
        )
    del dense, sparse_t
    # a long stream: 100 tasks x 2 classes at the paper size, about 200 samples per task (auto layout)
    rows_s, y_s = _stream(100 * 200, 200, C, M, args.spread, rng)
    order = np.argsort(y_s // 2, kind="stable")
    rows_s, y_s = torch.from_numpy(rows_s[order]), torch.from_numpy(y_s[order])
    bounds = np.searchsorted(y_s.numpy() // 2, np.arange(101))
    st = CountTable(n_rows, 0)
    per_task = []
    for task in range(100):
        t0 = time.perf_counter()
        st.add_classes(2)
        sl = slice(int(bounds[task]), int(bounds[task + 1]))
        st.add(rows_s[sl], y_s[sl], torch.ones(sl.stop - sl.start, dtype=torch.float64))
        st.scores(rows_s[sl], "logp", a)
        per_task.append(time.perf_counter() - t0)
    res["100x2 stream s/task first 10 / last 10"] = (
        round(float(np.mean(per_task[:10])), 3),
        round(float(np.mean(per_task[-10:])), 3),
    )
    res["100x2 stream store MiB at the end"] = round(st.nbytes() / 2**20)
    del st
    if not args.no_values:
        vt = ValueTable(n_rows, 1000)
        vt.blocks[0].fill_(0.01)  # touch the pages
        table_bytes = vt.nbytes()
        before = _reset_peak()
        t0 = time.perf_counter()
        vt.add_classes(1)
        res["values add_classes at 1000 s"] = round(time.perf_counter() - t0, 3)
        res["values peak / table"] = round(1 + (_status("VmHWM:") - before) / table_bytes, 3)
        res["values table MiB"] = round(table_bytes / 2**20)
    for k, v in res.items():
        print(f"{k}: {v}", flush=True)
    return res


def logp_part(args, common, res, data, stream, predict_peak, add_one, X_test, y_test, X_keys):
    """The ``logp`` targets of ``--estimator`` (see :func:`estimator`)."""
    import gc
    import os
    import pickle
    import time

    import numpy as np

    from skdkvb import DKVBClassifier

    C, M, K = common["n_heads"], common["n_keys"], args.classes
    clf = DKVBClassifier(**common, decoder="logp").fit_keys(X_keys)
    res["logp fit: stream of classes s"] = round(stream(clf, args.per_class), 1)
    b = clf.bottleneck_
    res["logp fitted tensors MiB (target <= 1024)"] = round(b.nbytes() / 2**20)
    res["logp count table layout / MiB"] = (b.count_table.layout, round(b.count_table.nbytes() / 2**20))
    res["logp dense C*M*K float64 would be MiB"] = round(C * M * K * 8 / 2**20)
    clf.predict_proba(X_test[:100])
    res["logp predict_proba(2000) peak above pre-call MiB (target <= 512)"] = round(predict_peak(clf) / 2**20)
    res["logp held-out accuracy"] = round(float(clf.score(X_test, y_test)), 3)
    # 10 classes, same keys
    ten = DKVBClassifier(**common, decoder="logp").fit_keys(X_keys)
    X10, y10 = data(np.arange(10), args.per_class)
    ten.partial_fit(X10, y10)
    t_big, t_ten = [], []
    for _ in range(args.repeat):  # interleaved, minimum of repeats (shared machine)
        t0 = time.perf_counter()
        clf.predict(X_test)
        t_big.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ten.predict(X_test)
        t_ten.append(time.perf_counter() - t0)
    res["logp predict rows/s 10 classes"] = round(len(X_test) / min(t_ten))
    res[f"logp predict rows/s {K} classes"] = round(len(X_test) / min(t_big))
    res[f"logp predict ratio {K}/10 classes (target >= 0.5)"] = round(min(t_ten) / min(t_big), 2)
    del ten
    whole, grow, _ = add_one(clf)
    res["logp add one class: add_classes ms (target <= 50)"] = round(grow * 1e3, 2)
    res["logp add one class: whole partial_fit s"] = round(whole, 3)
    t0 = time.perf_counter()
    clf.predict(X_test)
    res["logp first predict(2000) after the new class s"] = round(time.perf_counter() - t0, 3)
    gc.collect()
    before = _reset_peak()
    with open(os.devnull, "wb") as sink:
        pickle.dump(clf, sink, protocol=5)
    res["logp pickle.dump(protocol=5) peak RSS above pre-call / model"] = round(
        (_status("VmHWM:") - before) / clf.bottleneck_.nbytes(), 3
    )
    del clf, b
    gc.collect()
    if args.tasks:
        # a long stream: tasks of 2 new classes (100 samples each); time per partial_fit
        clf = DKVBClassifier(**common, decoder="logp").fit_keys(X_keys)
        per_task = []
        for task in range(args.tasks):
            X, y = data(np.arange(2 * task, 2 * task + 2) % K, 100)
            t0 = time.perf_counter()
            clf.partial_fit(X, y)
            per_task.append(time.perf_counter() - t0)
        first, last = np.mean(per_task[:10]), np.mean(per_task[-10:])
        res[f"logp {args.tasks} tasks x 2 classes: partial_fit s/task first 10 / last 10"] = (
            round(float(first), 3),
            round(float(last), 3),
        )
        del clf
        gc.collect()


def estimator(args):
    import gc
    import os
    import pickle
    import time

    import numpy as np

    from skdkvb import DKVBClassifier
    from skdkvb._bottleneck import DiscreteKeyValueBottleneck

    C, M, d, D, K = 256, 4096, 14, args.features, args.classes
    rng = np.random.RandomState(0)
    centres = rng.normal(size=(K + 129, D)).astype(np.float32)  # K stream classes, then new ones

    def data(labels, per_class):
        y = np.repeat(labels, per_class)
        X = centres[y] + args.noise * rng.normal(size=(len(y), D)).astype(np.float32)
        return X, y

    growth = []
    original = DiscreteKeyValueBottleneck.add_classes

    def timed_add_classes(self, n_new):
        t0 = time.perf_counter()
        original(self, n_new)
        growth.append(time.perf_counter() - t0)

    DiscreteKeyValueBottleneck.add_classes = timed_add_classes
    res = {}
    X_test, y_test = data(rng.randint(0, K, 2000), 1)
    X_keys, _ = data(np.arange(K), 8)

    def stream(clf, per_class):
        t0 = time.perf_counter()
        for lo in range(0, K, 25):
            X, y = data(np.arange(lo, min(K, lo + 25)), per_class)
            clf.partial_fit(X, y)
        return time.perf_counter() - t0

    def predict_peak(clf):
        gc.collect()
        before = _reset_peak()
        clf.predict_proba(X_test)
        return _status("VmHWM:") - before

    def add_one(clf, label=K):
        X, y = data(np.full(1, label), args.per_class)
        growth.clear()
        gc.collect()
        before = _reset_peak()
        t0 = time.perf_counter()
        clf.partial_fit(X, y)
        return time.perf_counter() - t0, sum(growth), _status("VmHWM:") - before

    common = dict(n_heads=C, n_keys=M, key_dim=d, key_init="random", device="cpu", random_state=0)
    if not args.no_logp:
        logp_part(args, common, res, data, stream, predict_peak, add_one, X_test, y_test, X_keys)
    if not args.no_values:
        # ---- sgd at K classes: few samples per class (only the growth and the memory are measured)
        sgd = dict(common, n_keys=args.sgd_keys)
        clf = DKVBClassifier(**sgd, decoder="sgd", values_dtype=args.sgd_dtype).fit_keys(X_keys)
        res["sgd fit: stream of classes s"] = round(stream(clf, args.sgd_per_class), 1)
        vt = clf.bottleneck_.value_table
        table = vt.nbytes()
        res[f"sgd value table ({args.sgd_dtype}) MiB / capacity"] = (round(table / 2**20), vt.capacity)
        dense = C * args.sgd_keys * K * vt.blocks[0].element_size()
        res[f"sgd dense C*M*K ({args.sgd_dtype}) MiB"] = round(dense / 2**20)
        whole, grow, peak = add_one(clf)
        res["sgd add one class: add_classes ms"] = round(grow * 1e3, 2)
        res["sgd add one class: whole partial_fit s (target <= 0.5)"] = round(whole, 3)
        res["sgd add one class: peak RSS above pre-call MiB"] = round(peak / 2**20)
        res["sgd add one class: peak / value table (target <= 1.25)"] = round(1 + peak / table, 3)
        res["sgd predict_proba(2000) peak above pre-call MiB"] = round(predict_peak(clf) / 2**20)
        # the worst case: a class past the capacity (a new block is allocated)
        full = vt.capacity - vt.n_classes
        if full:
            X, y = data(np.arange(K + 1, K + 1 + full), 1)
            clf.partial_fit(X, y)
        table = vt.nbytes()
        whole, grow, peak = add_one(clf, K + 1 + full)
        res["sgd add one class past the capacity: add_classes ms"] = round(grow * 1e3, 2)
        res["sgd add one class past the capacity: whole partial_fit s (target <= 0.5)"] = round(whole, 3)
        res["sgd add one class past the capacity: peak / value table before (target <= 1.25)"] = round(
            1 + peak / table, 3
        )
        res["sgd capacity after it"] = vt.capacity
        gc.collect()
        before = _reset_peak()
        with open(os.devnull, "wb") as sink:  # protocol 5 streams the tables from numpy views
            pickle.dump(clf, sink, protocol=5)
        res["sgd pickle.dump(protocol=5) peak RSS above pre-call / model"] = round(
            (_status("VmHWM:") - before) / clf.bottleneck_.nbytes(), 3
        )
    DiscreteKeyValueBottleneck.add_classes = original
    for k, v in res.items():
        print(f"{k}: {v}", flush=True)
    return res


def main():
    p = parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 200000])
    p.add_argument("--tables", action="store_true", help="benchmark skdkvb._tables in isolation instead")
    p.add_argument("--stream", type=int, default=40000, help="samples of the --tables stream")
    p.add_argument("--spread", type=int, default=8, help="keys per class per head = 2*spread+1")
    p.add_argument("--no-values", action="store_true", help="--tables/--estimator: skip the sgd value table")
    p.add_argument("--estimator", action="store_true", help="the memory targets on DKVBClassifier instead")
    p.add_argument("--classes", type=int, default=1000, help="--estimator: classes of the stream")
    p.add_argument("--per-class", type=int, default=40, help="--estimator: samples per class (logp)")
    p.add_argument("--sgd-per-class", type=int, default=4, help="--estimator: samples per class (sgd)")
    p.add_argument("--sgd-dtype", default="bfloat16", help="--estimator: values_dtype of the sgd part")
    p.add_argument("--sgd-keys", type=int, default=4096, help="--estimator: n_keys of the sgd part")
    p.add_argument("--no-logp", action="store_true", help="--estimator: only the sgd part")
    p.add_argument("--tasks", type=int, default=100, help="--estimator: tasks of the 2-class stream (0: skip)")
    p.add_argument("--features", type=int, default=784, help="--estimator: input dimension D")
    p.add_argument("--noise", type=float, default=0.5, help="--estimator: cluster std (centres ~ N(0, 1))")
    p.add_argument("--repeat", type=int, default=3, help="--estimator: interleaved predict repeats")
    args = p.parse_args()
    device = setup(args)
    if args.tables:
        tables(args)
        return
    if args.estimator:
        estimator(args)
        return
    from _common import HERE

    rows = []
    for n in args.sizes:
        code = CHILD.format(root=str(HERE.parent), threads=args.threads, n=n, device=str(device))
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        row = {
            "n": n,
            "model MiB": round(r["model"] / 2**20),
            "peak RSS above pre-call MiB": round(r["extra"] / 2**20),
            "of which the returned probabilities MiB": round(r["output"] / 2**20, 1),
            "samples/s": round(n / r["seconds"]),
        }
        if "cuda_peak" in r:
            row["CUDA peak MiB"] = round(r["cuda_peak"] / 2**20)
        rows.append(row)
        print(row, flush=True)
    body = (
        "`predict_proba` of the paper-size model (`decoder='vote'`) on n random D=784 inputs. "
        "Target: peak <= 1 GiB above the model's own size, whatever n.\n\n" + table(rows)
    )
    write_section("memory", "Bounded memory (`bench_memory.py`)", body, args, device)


if __name__ == "__main__":
    main()
