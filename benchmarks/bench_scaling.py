"""Scaling of the predict path with n, M and C (and a throughput-vs-n plot).

Times projection + nearest-key search + ``vote`` decode of a bottleneck with
d=14 on D=784 random inputs, varying one of n (samples), M (keys per head)
and C (heads) around the paper's C=256, M=4096. Linear scaling shows as a
constant ``ns per sample*head*key``. Writes ``docs/_static/throughput_vs_n.png``
when matplotlib is installed.

Run: ``python benchmarks/bench_scaling.py [--full] [--device cuda]``.
"""

from __future__ import annotations

import torch
from _common import HERE, PAPER, best_time, paper_model, parser, setup, table, write_section


def measure(n, C, M, device, repeat=1):
    model = paper_model(784, device, n_heads=C, n_keys=M)
    model.counts = torch.ones((C, M, 10), dtype=torch.float64)  # every key "used": a fitted-looking table
    z = torch.randn((n, 784), generator=torch.Generator().manual_seed(n)).to(device)
    bias = model.search_bias(prune=False)

    def run():
        with torch.no_grad():
            for s in range(0, n, 8192):  # the classifier's block size
                model.decode(model.lookup(model.project(z[s : s + 8192]), bias=bias), "vote")

    t = best_time(run, device, repeat=repeat, warmup=0 if n > 8192 else 1)
    return {"n": n, "C": C, "M": M, "seconds": t, "samples/s": round(n / t), "ns per n*C*M": t / (n * C * M) * 1e9}


def main():
    p = parser(__doc__)
    p.add_argument("--full", action="store_true", help="n up to 200 000 (default stops at 64 000)")
    args = p.parse_args()
    device = setup(args)
    C, M = PAPER["n_heads"], PAPER["n_keys"]
    ns = [1000, 4000, 16000, 64000] + ([200000] if args.full else [])
    by_n = [measure(n, C, M, device) for n in ns]
    by_m = [measure(1024, C, m, device) for m in (256, 1024, 4096, 16384)]
    by_c = [measure(1024, c, M, device) for c in (16, 64, 256, 512)]
    for r in by_n + by_m + by_c:
        print(r, flush=True)
    body = (
        "Projection + search + `vote` decode, d=14, D=784. `ns per n*C*M` constant = linear scaling.\n\n"
        "vs n (C=256, M=4096):\n\n"
        + table(by_n)
        + "\n\nvs M (n=1024, C=256):\n\n"
        + table(by_m)
        + "\n\nvs C (n=1024, M=4096):\n\n"
        + table(by_c)
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["n"] for r in by_n], [r["samples/s"] for r in by_n], "o-")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("samples n")
        ax.set_ylabel("samples / s")
        ax.set_title(f"predict path, C={C}, M={M}, d=14, D=784 ({device.type})")
        fig.tight_layout()
        out = HERE.parent / "docs" / "_static" / "throughput_vs_n.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
        body += f"\n\nPlot: `docs/_static/{out.name}`."
    except ImportError:
        pass
    write_section("scaling", "Scaling with n, M, C (`bench_scaling.py`)", body, args, device)


if __name__ == "__main__":
    main()
