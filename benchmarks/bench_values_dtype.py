"""Value storage: memory and accuracy of float16 / bfloat16 values.

Values cost C*M*K floats (4 GiB at C=256, M=4096 with 1 000 classes). This
script trains a DKVB (``decoder='sgd'``) on Fashion-MNIST pixels in float32,
then (a) stores the trained values in float16 / bfloat16 and predicts with
them (post-training storage), and (b) trains with the value table itself in
the low-precision dtype (every SGD update rounded). It reports test accuracy
and the value-table size at the benchmark's and at the paper's size.

Run: ``python benchmarks/bench_values_dtype.py [--n 10000]``.
"""

from __future__ import annotations

import copy

import torch
from _common import fashion_mnist, parser, setup, table, write_section

from skdkvb import DKVBClassifier


def main():
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--keys", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()
    device = setup(args)
    X, y, Xt, yt = fashion_mnist(n_train=args.n, n_test=2000)
    params = dict(
        decoder="sgd",
        n_heads=args.heads,
        n_keys=args.keys,
        key_dim=14,
        key_init_epochs=2,
        max_epochs=args.epochs,
        device=str(device),
        random_state=0,
    )
    base = DKVBClassifier(**params).fit(X, y)
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        post = copy.deepcopy(base)
        for _, _, block in post.bottleneck_.value_table.segments():
            block.copy_(block.to(dtype).to(block.dtype))  # stored low precision, computed in float32
        acc_post = post.score(Xt, yt)
        acc_train = None
        if dtype != torch.float32:
            # Train with the table held in `dtype`: rows updated by index_add_ in that precision.
            low = DKVBClassifier(**params, values_dtype=str(dtype).removeprefix("torch."))
            try:
                low.fit(X, y)
                acc_train = low.score(Xt, yt)
            except RuntimeError as exc:  # an op without a kernel for this dtype
                acc_train = f"n/a ({str(exc)[:40]})"
        item = torch.finfo(dtype).bits // 8
        rows.append(
            {
                "values dtype": str(dtype).replace("torch.", ""),
                "table MiB (this run)": round(args.heads * args.keys * 10 * item / 2**20, 1),
                "table GiB at C=256, M=4096, K=1000": round(256 * 4096 * 1000 * item / 2**30, 2),
                "test acc, stored after float32 training": round(acc_post, 4),
                "test acc, trained in this dtype": acc_train
                if not isinstance(acc_train, float)
                else round(acc_train, 4),
            }
        )
        print(rows[-1], flush=True)
    body = (
        f"Fashion-MNIST, {args.n} training / 2000 test images, C={args.heads}, M={args.keys}, d=14, "
        f"{args.epochs} epochs, `decoder='sgd'`.\n\n" + table(rows)
    )
    write_section("values", "Value storage dtype (`bench_values_dtype.py`)", body, args, device)


if __name__ == "__main__":
    main()
