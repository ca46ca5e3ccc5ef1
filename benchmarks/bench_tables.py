"""Growing tables of ``skdkvb._tables`` in isolation at the paper size (256 heads x 4096 keys).

Prints (nothing is written to README.md):

- bytes of the count store at 1,000 classes after a ``--stream``-sample stream (store, row totals
  and scoring caches), against a dense float64 table;
- ``scores`` (``logp``) rows/s at 10 classes (dense layout) and at 1,000 classes (sparse store),
  interleaved, minimum of ``--repeat`` runs, and their ratio (taken in the same run), first with the
  runs the stream left, then after ``compact()`` (the state reads reach by amortisation); the peak RSS
  of one ``scores`` call on 2,000 rows above the RSS before it;
- ``add_classes(1)`` at 1,000 classes, and the first ``scores`` after it against a steady one
  (what the next predict pays for the growth);
- a stream of 100 tasks x 2 classes (about 200 samples per task): time per task (add + score of
  the task's rows), mean of the first 10 against the last 10 tasks, and the same for the score
  alone (the part that grows with the number of classes decoded);
- ``pickle.dump(protocol=5)`` of a 1 GiB value table and of the 1,000-class count table to a sink
  that keeps nothing: peak of Python allocations (tracemalloc) and of the process RSS above the
  table, as a fraction of the table's bytes.

Run: ``python benchmarks/bench_tables.py [--stream 40000] [--repeat 5] [--no-pickle]``.
The classes of the synthetic stream sit near a few keys per head (``--spread``) with 80 % of
the (sample, head) pairs on a random key, as in ``bench_memory.py --tables``.
"""

from __future__ import annotations

import functools
import gc
import pickle
import time

import numpy as np
import torch
from _common import parser, setup

C, M, A = 256, 4096, 0.1
N_ROWS = C * M


def _stream(n, n_classes, rng, spread=8, noise=0.8):
    centre = rng.randint(0, M, size=(n_classes, C))
    y = rng.randint(0, n_classes, size=n)
    keys = (centre[y] + rng.randint(-spread, spread + 1, size=(n, C))) % M
    random = rng.rand(n, C) < noise
    keys[random] = rng.randint(0, M, size=int(random.sum()))
    return torch.from_numpy(keys + np.arange(C) * M), torch.from_numpy(y)


def _status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak():
    """Hand freed heap pages back (glibc malloc_trim), then reset the peak-RSS counter."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return _status("VmRSS:")


class _Sink:
    n = 0

    def write(self, b):
        m = memoryview(b)
        self.n += m.nbytes
        return m.nbytes


def _fill(CountTable, n_classes, n, rng, device, batch=1000):
    rows, y = _stream(n + 2000, n_classes, rng)
    t = CountTable(N_ROWS, n_classes, device=device)
    w = torch.ones(batch, dtype=torch.float64)
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        m = min(batch, n - s)
        t.add(rows[s : s + m].to(device), y[s : s + m].to(device), w[:m].to(device))
    return t, time.perf_counter() - t0, rows[n:].to(device), y[n:]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def _pickle_peak(obj, nbytes):
    import tracemalloc

    gc.collect()
    before = _reset_peak()
    tracemalloc.start()
    sink = _Sink()
    t0 = time.perf_counter()
    pickle.dump(obj, sink, protocol=5)
    dt = time.perf_counter() - t0
    py_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss_peak = _status("VmHWM:") - before
    return sink.n, py_peak / nbytes, max(0, rss_peak) / nbytes, dt


def main():
    p = parser(__doc__)
    p.add_argument("--stream", type=int, default=40000, help="samples of the 1,000-class stream")
    p.add_argument("--repeat", type=int, default=5, help="interleaved repeats of the timings (minimum)")
    p.add_argument("--no-pickle", action="store_true", help="skip the pickle peaks (the 1 GiB value table)")
    args = p.parse_args()
    device = setup(args)
    from skdkvb._tables import CountTable, ValueTable

    rng = np.random.RandomState(0)
    res = {}

    def put(k, v):
        res[k] = v
        print(f"{k}: {v}", flush=True)

    big, dt, q, qy = _fill(CountTable, 1000, args.stream, rng, device)
    put("fill 1000 classes s (adds of 1000 samples)", round(dt, 2))
    big.scores(q[:10], "logp", A)  # corrections of the runs
    put("layout / runs at 1000 classes", (big.layout, big.n_runs))
    put("store + caches MiB at 1000 classes", round(big.nbytes() / 2**20, 1))
    put("dense float64 would be MiB", round(N_ROWS * 1000 * 8 / 2**20))
    small, dt, q10, _ = _fill(CountTable, 10, args.stream, rng, device)
    put("layout at 10 classes", small.layout)
    small.scores(q10[:10], "logp", A)
    t_small, t_big = [], []
    score_small = functools.partial(small.scores, q10, "logp", A)
    score_big = functools.partial(big.scores, q, "logp", A)
    for _ in range(args.repeat):  # interleaved: both see the same load
        t_small.append(_timed(score_small, device)[0])
        t_big.append(_timed(score_big, device)[0])
    put("runs after the scores (reads amortise a compaction)", big.n_runs)
    n_q = q.shape[0]
    put("scores rows/s 10 classes (dense)", round(n_q / min(t_small)))
    put("scores rows/s 1000 classes (sparse)", round(n_q / min(t_big)))
    put("ratio 1000/10 classes", round(min(t_small) / min(t_big), 2))
    t0 = time.perf_counter()
    big.compact()
    put("compact() s (what the reads amortise)", round(time.perf_counter() - t0, 2))
    big.scores(q[:10], "logp", A)
    t_small, t_big = [], []
    for _ in range(args.repeat):
        t_small.append(_timed(score_small, device)[0])
        t_big.append(_timed(score_big, device)[0])
    put("compacted: scores rows/s 10 / 1000 classes", (round(n_q / min(t_small)), round(n_q / min(t_big))))
    put("compacted: ratio 1000/10 classes", round(min(t_small) / min(t_big), 2))
    before = _reset_peak()
    s_big = big.scores(q, "logp", A)
    put("scores(2000) at 1000 classes: RSS peak above the call MiB", round(max(0, _status("VmHWM:") - before) / 2**20))
    put("held-out accuracy at 1000 classes", round(float((s_big.argmax(1).cpu() == qy).float().mean()), 4))
    del small, score_small
    grow, first, steady = [], [], []
    for _ in range(args.repeat):
        steady.append(_timed(score_big, device)[0])
        grow.append(_timed(functools.partial(big.add_classes, 1), device)[0])
        first.append(_timed(score_big, device)[0])
    put("add_classes(1) at 1000 classes ms", round(min(grow) * 1e3, 3))
    put("first scores(2000) after it / steady s", (round(min(first), 3), round(min(steady), 3)))
    del s_big, score_big

    # 100 tasks x 2 classes, about 200 samples per task, auto layout
    rows_s, y_s = _stream(100 * 200, 200, rng)
    order = torch.argsort(torch.div(y_s, 2, rounding_mode="floor"), stable=True)
    rows_s, y_s = rows_s[order].to(device), y_s[order].to(device)
    bounds = np.searchsorted((y_s.cpu() // 2).numpy(), np.arange(101))
    st = CountTable(N_ROWS, 0, device=device)
    per_task, per_add, per_score = [], [], []
    for task in range(100):
        sl = slice(int(bounds[task]), int(bounds[task + 1]))
        w = torch.ones(sl.stop - sl.start, dtype=torch.float64, device=device)
        t0 = time.perf_counter()
        st.add_classes(2)
        st.add(rows_s[sl], y_s[sl], w)
        _sync(device)
        t1 = time.perf_counter()
        st.scores(rows_s[sl], "logp", A)
        _sync(device)
        t2 = time.perf_counter()
        per_task.append(t2 - t0)
        per_add.append(t1 - t0)
        per_score.append(t2 - t1)

    def fl(x):
        return (round(float(np.mean(x[:10])), 4), round(float(np.mean(x[-10:])), 4))

    put("100x2 stream s/task first 10 / last 10", fl(per_task))
    put("100x2 stream add s/task first 10 / last 10", fl(per_add))
    put("100x2 stream score s/task first 10 / last 10", fl(per_score))
    put("100x2 stream layout / runs / store MiB", (st.layout, st.n_runs, round(st.nbytes() / 2**20, 1)))
    del st

    if not args.no_pickle and torch.device(device).type == "cpu":
        n, py, rss, _ = _pickle_peak(big, sum(a.nbytes for a in big.state_dict().values()))
        put(
            "pickle 1000-class count table: MiB, py peak/table, rss peak/table",
            (round(n / 2**20), round(py, 4), round(rss, 3)),
        )
        del big
        gc.collect()
        vt = ValueTable(N_ROWS, 256)  # 1 GiB of float32
        vt.blocks[0].fill_(0.01)
        n, py, rss, _ = _pickle_peak(vt, vt.nbytes())
        put(
            "pickle 1 GiB value table: MiB, py peak/table, rss peak/table",
            (round(n / 2**20), round(py, 4), round(rss, 3)),
        )
    return res


if __name__ == "__main__":
    main()
