"""Peak memory of ``predict_proba`` against n: bounded by chunking, not by n.

Each n runs in a fresh subprocess: a paper-size model (C=256, M=4096, d=14,
D=784) is fitted on 2 048 samples, ``n`` random inputs are created, the
kernel's peak-RSS counter is reset (``/proc/self/clear_refs``) and
``predict_proba`` runs. Reported: peak RSS above the RSS just before the call
(inputs and model already resident), against the model's own size.

Run: ``python benchmarks/bench_memory.py [--sizes 10000 50000 200000]``.
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
model = sum(t.numel() * t.element_size() for t in list(clf.bottleneck_.parameters()) + list(clf.bottleneck_.buffers()))
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


def main():
    p = parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 200000])
    args = p.parse_args()
    device = setup(args)
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
