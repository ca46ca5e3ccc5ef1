"""Preprocessing overhead of the embedders: TimmEmbedder.transform on raw images against the bare model's forward.

Usage: python benchmarks/bench_embed.py [--model tf_efficientnet_lite0] [--size 224] [--batch 32] [--repeats 3]

Both sides embed the same batch of 28x28 grey uint8 images (Fashion-MNIST's
format). The bare side gets the batch already resized and normalised (what
the network needs), so the ratio is the cost of everything the embedder adds:
uint8 to float, resize, grey to RGB, normalisation and the copies. The issue's
target is a ratio <= 1.2. Random weights: the timing does not depend on them.
Report the ratio measured in one run (both sides interleaved, best of repeats).
"""

import argparse
import time
import warnings

import numpy as np
import torch

from skdkvb.encoders import TimmEmbedder


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    X = np.random.default_rng(0).integers(0, 256, (args.batch, 28, 28, 1), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb = TimmEmbedder(
            args.model, data_config={"input_size": (3, args.size, args.size)}, batch_size=args.batch, device="cpu"
        ).fit(X)
    encoder = emb.encoder_
    model = encoder.model
    with torch.inference_mode():
        ready = encoder._preprocess(encoder._to_device(X, "uint8"), "uint8").contiguous()

    def bare():
        with torch.inference_mode():
            model(ready)

    def embedder():
        emb.transform(X)

    bare(), embedder()  # warm-up
    t_bare = t_emb = float("inf")
    for _ in range(args.repeats):  # interleaved, so that load changes hit both sides
        t_bare = min(t_bare, best_of(bare, 1))
        t_emb = min(t_emb, best_of(embedder, 1))
    print(
        f"{args.model} @ {args.size}px, batch {args.batch}, {torch.get_num_threads()} threads: "
        f"bare forward {1000 * t_bare / args.batch:.1f} ms/img, TimmEmbedder {1000 * t_emb / args.batch:.1f} ms/img, "
        f"ratio {t_emb / t_bare:.2f}"
    )


if __name__ == "__main__":
    main()
