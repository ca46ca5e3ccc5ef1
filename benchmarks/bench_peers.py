"""Peers on the same machine and run: the PyPI DKVB package and scikit-learn.

* Forward (lookup + decode) and training-step throughput against
  ``discrete-key-value-bottleneck-pytorch`` 0.1.1 (``pip install
  discrete-key-value-bottleneck-pytorch==0.1.1``) at C=256, M=4096, d=14 on
  D=784 inputs. It only builds with ``codebook_dim=14`` passed through to
  vector-quantize-pytorch; each of its measurements is time-boxed.
* ``partial_fit`` throughput against ``SGDClassifier`` and ``MLPClassifier``
  on the same Fashion-MNIST pixels.

Run: ``python benchmarks/bench_peers.py [--peer-batch 32]``.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import torch
from _common import PAPER, fashion_mnist, parser, setup, table, write_section
from sklearn.linear_model import SGDClassifier
from sklearn.neural_network import MLPClassifier

from skdkvb import DKVBClassifier


def rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, budget_s=20.0, min_calls=2):
    """Mean seconds per call over calls made within ``budget_s`` (after one warm-up)."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < budget_s / 4:
        fn()
        calls += 1
        if time.perf_counter() - t0 > budget_s:
            break
    return (time.perf_counter() - t0) / calls


def peer(X, y, batch, device):
    try:
        from discrete_key_value_bottleneck_pytorch import DiscreteKeyValueBottleneck
    except ImportError:
        return None
    torch.manual_seed(0)
    rss0 = rss_gib()
    model = DiscreteKeyValueBottleneck(
        dim=PAPER["key_dim"],
        num_memories=PAPER["n_keys"],
        dim_embed=X.shape[1],
        num_memory_codebooks=PAPER["n_heads"],
        dim_memory=10,
        codebook_dim=PAPER["key_dim"],
        decay=0.95,
    ).to(device)
    xb = torch.as_tensor(X[:batch], device=device).unsqueeze(1)
    yb = torch.as_tensor(y[:batch], device=device)

    def forward():
        model.eval()
        with torch.no_grad():
            return model(xb)

    opt = torch.optim.SGD([model.values], lr=0.3)

    def train_step():
        model.train()
        loss = torch.nn.functional.cross_entropy(model(xb)[:, 0], yb)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_fwd = timed(forward)
    t_train = timed(train_step)
    return {"forward": batch / t_fwd, "train": batch / t_train, "rss": rss_gib() - rss0}


def ours(X, y, batch, device, epochs):
    rss0 = rss_gib()
    clf = DKVBClassifier(
        **PAPER, decoder="sgd", key_init="random", max_epochs=epochs, device=str(device), random_state=0
    )
    clf.fit(X, y)  # build; keys from the data
    xb = X[:batch]
    t_fwd = timed(lambda: clf.decision_function(xb))
    clf.set_params(warm_start=True)
    t = time.perf_counter()
    clf.fit(X, y)  # `epochs` epochs over len(X) samples: one search, then cached indices
    t_train = time.perf_counter() - t
    return {"forward": batch / t_fwd, "train": len(X) * epochs / t_train, "rss": rss_gib() - rss0}


def main():
    p = parser(__doc__)
    p.add_argument("--peer-batch", type=int, default=32)
    p.add_argument("--n", type=int, default=2048, help="samples for our multi-epoch run and partial_fit")
    p.add_argument("--epochs", type=int, default=10)
    args = p.parse_args()
    device = setup(args)
    X, y, _, _ = fashion_mnist(n_train=max(args.n, 4096), n_test=10)
    X, y = X[: args.n], y[: args.n]
    rows = []
    mine = ours(X, y, 256, device, args.epochs)
    other = peer(X, y, args.peer_batch, device)
    rows.append(
        {
            "implementation": "skdkvb",
            "forward samples/s": round(mine["forward"]),
            "training samples/s": round(mine["train"]),
            "extra RSS GiB": round(mine["rss"], 2),
            "note": f"forward batch 256; training = fit of {args.epochs} epochs over {args.n} samples",
        }
    )
    if other is None:
        rows.append({"implementation": "discrete-key-value-bottleneck-pytorch", "note": "not installed"})
    else:
        rows.append(
            {
                "implementation": "discrete-key-value-bottleneck-pytorch 0.1.1",
                "forward samples/s": round(other["forward"], 1),
                "training samples/s": round(other["train"], 1),
                "extra RSS GiB": round(other["rss"], 2),
                "note": f"batch {args.peer_batch}, one forward+backward+SGD step per batch",
            }
        )
        rows.append(
            {
                "implementation": "ratio skdkvb / peer",
                "forward samples/s": f"{mine['forward'] / other['forward']:.0f}x",
                "training samples/s": f"{mine['train'] / other['train']:.0f}x",
                "extra RSS GiB": "",
                "note": "",
            }
        )
    # partial_fit throughput, one pass over the same samples in batches of 256.
    classes = np.unique(y)
    pf = []
    for name, est in [
        (
            "DKVBClassifier (paper size)",
            DKVBClassifier(**PAPER, decoder="sgd", key_init="random", device=str(device), random_state=0),
        ),
        ("SGDClassifier", SGDClassifier(random_state=0)),
        ("MLPClassifier(100)", MLPClassifier(random_state=0)),
    ]:
        est.partial_fit(X[:256], y[:256], classes=classes)  # first call builds the model
        t = time.perf_counter()
        for s in range(256, len(X), 256):
            est.partial_fit(X[s : s + 256], y[s : s + 256])
        pf.append({"estimator": name, "partial_fit samples/s": round((len(X) - 256) / (time.perf_counter() - t))})
    base = pf[0]["partial_fit samples/s"]
    for r in pf:
        r["relative to DKVB"] = f"{r['partial_fit samples/s'] / base:.1f}x"
    body = (
        "Same machine, same run, C=256, M=4096, d=14, D=784 (Fashion-MNIST pixels), 10 classes.\n\n"
        + table(rows)
        + "\n\n`partial_fit` throughput, batches of 256 (DKVB: one search + one SGD epoch per call):\n\n"
        + table(pf)
    )
    write_section("peers", "Peers (`bench_peers.py`)", body, args, device)


if __name__ == "__main__":
    main()
