"""Roofline of the key search: effective FLOP rate against the machine's FMA peak and a plain matmul.

The predict-path search (projection + nearest key of every head) at the
paper's C=256, M=4096, d=14 for D=512 and D=784 inputs. Its brute-force cost
is ``n * C * (2*D*d + 2*M*d)`` FLOPs; dividing by wall time gives an
*effective* rate, compared with the float32 FMA peak measured by a native
register-resident loop (:func:`_common.fma_peak_gflops`, see
``bench_peak.py``) and with a 2048x2048 float32 ``torch.matmul``, both timed
right before each measurement (the machine may be shared: every ratio uses
its own reference). The ``native (search only)`` rows time the kernel on
precomputed queries, counting ``n * C * 2*M*d`` FLOPs.

Back-ends:

* ``native``: the fused C++ kernel of :mod:`skdkvb._search` (default on CPU);
* ``native int8`` / ``native int16`` (search only): the integer VNNI shortlist
  with float32 re-check (``SKDKVB_SEARCH_PRECISION``), same selected keys;
* ``torch``: the cache-tiled ``bmm`` + ``argmin`` fallback;
* ``naive``: one ``baddbmm`` over all heads into a 32 MiB block + ``argmin``
  (the first implementation, kept here as the baseline);
* ``compiled`` (``--compile``): ``torch.compile`` of a fused
  multiply-add/argmin expression (inductor C++ codegen).

Run: ``python benchmarks/bench_search.py [--device cuda] [--compile] [--data random,fmnist] [--only-search]``.
"""

from __future__ import annotations

import time
from functools import partial

import torch
from _common import (
    PAPER,
    best_time,
    fashion_mnist,
    fma_peak_gflops,
    matmul_gflops,
    paper_model,
    parser,
    setup,
    table,
    write_section,
)

from skdkvb import _native, _search


def naive_search(q, keys, bias):
    n, C, _ = q.shape
    block = _search.block_size_for(C, keys.shape[1])
    kt = keys.transpose(1, 2)
    out = torch.empty((n, C), dtype=torch.long, device=q.device)
    for s in range(0, n, block):
        dist = torch.baddbmm(bias.unsqueeze(1), q[s : s + block].transpose(0, 1), kt, alpha=-2.0)
        out[s : s + block] = dist.argmin(-1).T
    return out


def compiled_search():
    def fused(q, kt, bias):  # q (C, b, d), kt (C, d, M) holding -2k
        acc = bias.unsqueeze(1)
        for j in range(kt.shape[1]):
            acc = acc + q[:, :, j : j + 1] * kt[:, j : j + 1, :]
        return acc.argmin(-1)

    fn = torch.compile(
        fused,
        dynamic=False,
        options={"cpp.enable_floating_point_contract_flag": "fast"},
    )

    def run(q, keys, bias, block=256):
        kt = (keys * -2.0).transpose(1, 2).contiguous()
        n = q.shape[0]
        out = torch.empty((n, q.shape[1]), dtype=torch.long, device=q.device)
        for s in range(0, n, block):
            qb = q[s : s + block]
            if qb.shape[0] < block:  # fixed shapes: one compilation
                qb = torch.cat([qb, qb.new_zeros((block - qb.shape[0],) + qb.shape[1:])])
            out[s : s + block] = fn(qb.transpose(0, 1).contiguous(), kt, bias).T[: min(block, n - s)]
        return out

    return run


def with_backend(name, fn):
    """Run ``fn`` with the native kernel forced off for the torch back-end."""
    if name != "torch":
        return fn()
    saved = dict(_native.state)
    _native.state.update(nearest=None, nearest_lp=None)
    try:
        return fn()
    finally:
        _native.state.clear()
        _native.state.update(saved)


#: Precision of the search-only rows: float32 kernel, int8 / int16 shortlist + float32 re-check.
LOWP_BITS = {"native int8 (search only)": 8, "native int16 (search only)": 16}


def workload(name, model, z, bias, compiled):
    """The timed callable of one back-end."""
    if "search only" in name:
        with torch.no_grad():
            q = model.project(z).contiguous()
        keys = model.keys.float().contiguous()
        fp = _native.nearest_fn()
        if name in LOWP_BITS:
            lowp, bits = _native.state.get("nearest_lp"), LOWP_BITS[name]
            return lambda: _search._native_search(fp, q, keys, bias, lowp=lowp, bits=bits)
        return lambda: _search._native_search(fp, q, keys, bias)
    if name == "naive":
        return lambda: naive_search(model.project(z), model.keys, bias)
    if name == "compiled":
        t0 = time.perf_counter()
        compiled(model.project(z), model.keys, bias)
        print(f"torch.compile took {time.perf_counter() - t0:.1f} s")
        return lambda: compiled(model.project(z), model.keys, bias)
    return lambda: model.lookup(model.project(z), bias=bias)


def dataset(name, D, n, device):
    """(model, queries' inputs z): keys are sampled from the same data as the queries."""
    if name == "fmnist":
        if D != 784:
            return None
        try:
            X_train, _, X_test, _ = fashion_mnist(n_train=10000, n_test=max(n, 1))
        except OSError as exc:  # the dataset package is not installed: skip these rows
            print(f"skipping the Fashion-MNIST rows: {exc}")
            return None
        data = torch.as_tensor(X_train, dtype=torch.float32)
        z = torch.as_tensor(X_test[:n], dtype=torch.float32)
        return paper_model(D, device, data=data), z.to(device)
    z = torch.randn((n, D), generator=torch.Generator().manual_seed(1))
    return paper_model(D, device), z.to(device)


def recheck_stats(model, z, bias, bits):
    """Mean float32 re-checked key blocks (of 16) and shortlisted groups (of 4 blocks) per query-head."""
    with torch.no_grad():
        q = model.project(z).contiguous()
    st = _search.lowp_stats(q, model.keys, bias, bits=bits)
    ref = _search._native_search(_native.nearest_fn(), q, model.keys.float().contiguous(), bias)
    assert torch.equal(st["indices"], ref), "low-precision search differs from the float32 kernel"
    return st


def main():
    p = parser(__doc__)
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile (slow to compile)",
    )
    p.add_argument("--repeat", type=int, default=5, help="interleaved repeats; the best of each is kept")
    p.add_argument(
        "--data",
        default="random,fmnist",
        help="comma-separated: random (Gaussian inputs, D=512 and 784) and/or fmnist (Fashion-MNIST pixels, D=784)",
    )
    p.add_argument("--n", type=int, default=2048, help="queries per timed call of the native back-ends")
    p.add_argument("--only-search", action="store_true", help="time the search-only rows (float32/int8/int16) only")
    args = p.parse_args()
    device = setup(args)
    cuda = device.type == "cuda"
    backends = {
        "native": args.n,
        "native (search only)": args.n,
        "native int8 (search only)": args.n,
        "native int16 (search only)": args.n,
        "torch": 512,
        "naive": 256,
    }
    if args.only_search:
        backends = {k: v for k, v in backends.items() if "search only" in k}
    if cuda:
        backends = {"torch": 8192, "naive": 8192}
    elif _native.nearest_fn() is None or _native.state.get("nearest_lp") is None:
        backends = {k: v for k, v in backends.items() if k not in LOWP_BITS}
    if args.compile:
        backends["compiled"] = 1024
    compiled = compiled_search() if args.compile else None
    rows = []
    C, M, d = PAPER["n_heads"], PAPER["n_keys"], PAPER["key_dim"]
    for data in args.data.split(","):
        for D in (512, 784):
            n_max = max(backends.values())
            made = dataset(data, D, n_max, device)
            if made is None:
                continue
            model, z_all = made
            bias = model.search_bias(prune=False).float()
            fns = {name: workload(name, model, z_all[:n], bias, compiled) for name, n in backends.items()}
            # Peak, matmul and every back-end timed in turn, `repeat` times: a burst of
            # load on the shared machine then hits all of them, and the best of each is kept.
            peaks, refs, times = [], [], {name: [] for name in backends}
            with torch.no_grad():
                for name, fn in fns.items():
                    with_backend(name, fn)  # warm-up
                for _ in range(args.repeat):
                    peaks.append(fma_peak_gflops(args.threads, repeat=1) if not cuda else float("nan"))
                    refs.append(matmul_gflops(device, repeat=1))
                    for name, fn in fns.items():
                        times[name].append(with_backend(name, partial(best_time, fn, device, 1, 0)))
            peak, ref = max(peaks), max(refs)
            t_fp32 = min(times["native (search only)"]) if "native (search only)" in times else None
            for name, n in backends.items():
                t = min(times[name])
                flops = n * C * ((0 if "only" in name else 2 * D * d) + 2 * M * d)
                rate = flops / t / 1e9
                row = {
                    "data": data,
                    "D": D,
                    "back-end": name,
                    "n": n,
                    "samples/s": round(n / t),
                    "effective GFLOP/s": round(rate, 1),
                    "% of FMA peak": f"{rate / peak:.0%}",
                    "FMA peak GFLOP/s": round(peak, 1),
                    "matmul GFLOP/s": round(ref, 1),
                    "ratio to matmul": f"{rate / ref:.0%}",
                    "vs float32 kernel": f"{t_fp32 / t:.2f}x" if t_fp32 and "only" in name else "",
                    "re-checked blocks / query-head": "",
                }
                if name in LOWP_BITS:
                    st = recheck_stats(model, z_all[:n], bias, LOWP_BITS[name])
                    groups = st["blocks_shortlisted"] / max(1, st["int8"])
                    per_query = st["blocks_per_query"]
                    row["re-checked blocks / query-head"] = f"{per_query:.2f} (shortlisted groups {groups:.1f})"
                rows.append(row)
                print(row, flush=True)
    body = (
        "Effective rate = brute-force FLOPs `n*C*(2*D*d + 2*M*d)` / wall time, at C=256, M=4096, d=14, "
        "float32, projection included (`... (search only)`: the kernel on precomputed queries, "
        "`n*C*2*M*d` FLOPs, float32-equivalent for the int8/int16 rows, whose selected keys are checked to be "
        "identical to the float32 kernel's). `% of FMA peak` divides by the float32 FMA peak of a "
        "register-resident native loop, `ratio to matmul` by a 2048x2048 `torch.matmul`, on the same threads; "
        "all are timed in turn, repeatedly, and the best of each is kept (shared machine). "
        "`re-checked blocks`: blocks of 16 keys recomputed in float32 per query and head (out of 256). "
        "`random`: Gaussian inputs; `fmnist`: Fashion-MNIST pixels, keys sampled from the training images. "
        "Target: >= 60% of the FMA peak (float32), >= 100% with low precision.\n\n" + table(rows)
    )
    write_section("search", "Key search roofline (`bench_search.py`)", body, args, device)


if __name__ == "__main__":
    main()
