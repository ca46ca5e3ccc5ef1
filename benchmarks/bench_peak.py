"""The machine's float32 FMA peak, measured with a small native loop, against a 2048x2048 matmul.

Every "% of peak" in these benchmarks divides by this number, measured in the
same run. The loop (``skdkvb_fma_loop``, ``skdkvb/_kernels/info.cpp``) runs
chains of fused multiply-adds on 12 independent register-resident vector
accumulators (the build's widest vectors: 16 lanes on AVX-512), one copy per thread, best of several runs.

Run: ``python benchmarks/bench_peak.py [--threads 2]``.
"""

from __future__ import annotations

from _common import fma_peak_gflops, matmul_gflops, parser, setup, table, write_section

from skdkvb._native import backend_info


def main():
    args = parser(__doc__).parse_args()
    device = setup(args)
    info = backend_info()
    rows = []
    for threads in sorted({1, args.threads}):
        peak = fma_peak_gflops(threads)
        rows.append({"threads": threads, "FMA peak GFLOP/s": round(peak, 1)})
    peak = rows[-1]["FMA peak GFLOP/s"]
    mm = matmul_gflops(device)
    rows.append(
        {
            "threads": f"{args.threads} (2048² torch.matmul)",
            "FMA peak GFLOP/s": f"{mm:.1f} ({mm / peak:.0%} of peak)",
        }
    )
    body = (
        f"Kernels built for `{info['build_isa']}`; CPU features at run time: `{info['cpu_features']}`. "
        "Shared machine: minimum time of 5 runs.\n\n" + table(rows)
    )
    write_section("peak", "Float32 FMA peak (`bench_peak.py`)", body, args, device)


if __name__ == "__main__":
    main()
