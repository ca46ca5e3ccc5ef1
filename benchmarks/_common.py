"""Shared helpers of the benchmark scripts: timing, machine info, README sections.

Each script prints its table and replaces its own section of
``benchmarks/README.md`` (between ``<!-- name:start -->`` and
``<!-- name:end -->`` markers), so results of different scripts coexist.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

# Paper configuration (Träuble et al., 2023).
PAPER = {"n_heads": 256, "n_keys": 4096, "key_dim": 14}


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (reported numbers are CPU)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-readme", action="store_true", help="print only, do not update README.md")
    return p


def setup(args) -> torch.device:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return device


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device="cpu", repeat=3, warmup=1) -> float:
    """Minimum wall time of ``repeat`` calls (the least disturbed by other load)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_gflops(device="cpu", size=2048, repeat=3) -> float:
    """FLOP rate of a plain ``size x size`` float32 matmul: the machine's reference."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device)
    b = torch.randn(size, size, generator=g).to(device)
    return 2 * size**3 / best_time(lambda: torch.matmul(a, b), device, repeat) / 1e9


_FMA_ITERS: dict = {}


def fma_peak_gflops(threads: int | None = None, seconds: float = 0.2, repeat: int = 5) -> float:
    """The machine's float32 FMA peak: a register-resident FMA loop on ``threads`` threads.

    The loop (``skdkvb_fma_loop`` in ``skdkvb/_kernels/info.cpp``) keeps 12
    independent vector accumulators (16 lanes on AVX-512) in registers, enough to hide the FMA
    latency on current cores, so it runs at the rate the FMA units allow for
    the instruction set the kernels were built for. One copy runs on each
    thread at once; the best of ``repeat`` runs is kept.
    """
    from skdkvb import _native

    fn = _native.fma_loop_fn()
    if fn is None:
        raise SystemExit(f"native kernels unavailable: {_native.state.get('error')}")
    threads = threads or torch.get_num_threads()
    flops_per_iter = 12 * _native.backend_info()["vector_lanes"] * 2
    iters = _FMA_ITERS.get(seconds)
    if iters is None:
        iters = 10**6
        while True:  # calibrate once: about `seconds` per run on one thread
            t = time.perf_counter()
            fn(iters)
            dt = time.perf_counter() - t
            if dt > seconds / 4:
                iters = _FMA_ITERS[seconds] = int(iters * seconds / dt)
                break
            iters *= 4
    ranges = [(iters,)] * threads
    best = min(_timed(lambda: _native.run_split(fn, (), ranges)) for _ in range(repeat))
    return threads * iters * flops_per_iter / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def machine(device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from skdkvb._search import search_backend

    parts = [
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)",
        f"Python {platform.python_version()}, numpy {np.__version__}, search back-end: {search_backend()}",
    ]
    if torch.device(device).type == "cuda":
        parts.append(f"GPU: {torch.cuda.get_device_name()}")
    try:
        load = os.getloadavg()[0]
        parts.append(f"load average at start: {load:.1f}")
    except OSError:
        pass
    return "; ".join(parts)


def table(rows: list[dict], floatfmt: str = "{:.3g}") -> str:
    """A Markdown table from a list of dicts sharing keys."""
    cols = list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return floatfmt.format(v)
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str, args, device) -> None:
    """Print and store one script's results in its README section."""
    cmd = "python benchmarks/" + Path(sys.argv[0]).name + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    stamp = time.strftime("%Y-%m-%d %H:%M")
    text = (
        f"<!-- {name}:start -->\n## {title}\n\n"
        f"Command: `{cmd}` ({stamp})\n\nMachine: {machine(device)}\n\n{body.strip()}\n"
        f"<!-- {name}:end -->"
    )
    print(text)
    if args.no_readme:
        return
    old = README.read_text() if README.exists() else "# Benchmarks\n\nResults written by the scripts in this folder.\n"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.DOTALL)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip() + "\n\n" + text + "\n"
    README.write_text(new)


def paper_model(n_features: int, device, *, n_classes: int = 10, seed: int = 0, data=None, **config):
    """A fitted-looking bottleneck at the paper's size: keys are sampled queries (no k-means)."""
    from skdkvb._bottleneck import DiscreteKeyValueBottleneck

    cfg = {**PAPER, **config}
    gen = torch.Generator().manual_seed(seed)
    m = DiscreteKeyValueBottleneck(
        n_features,
        cfg["n_heads"],
        cfg["n_keys"],
        cfg["key_dim"],
        n_classes,
        generator=gen,
    )
    m = m.to(device)
    if data is None:
        data = torch.randn((cfg["n_keys"], n_features), generator=gen)
    rows = torch.randint(0, data.shape[0], (cfg["n_keys"],), generator=gen)
    with torch.no_grad():
        m.set_keys(m.project(data[rows].to(device)).transpose(0, 1))
    return m


def fashion_mnist(n_train=None, n_test=None):
    """Fashion-MNIST pixels scaled to [0, 1], float32 (n, 784), with int64 labels."""
    from skdkvb.continual.datasets import load_fashion_mnist

    d = load_fashion_mnist(n_train=n_train, n_test=n_test)
    return d.X_train / 255, d.y_train, d.X_test / 255, d.y_test
