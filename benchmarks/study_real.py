"""DKVB on real pretrained embeddings: Split-Fashion-MNIST through MobileNetV2 and EfficientNet-Lite0 (docs/results.md).

Usage: source .ci/weights.sh && python benchmarks/study_real.py [--subsample 3000] [--image-size 112]
       [--seeds 0 1 2] > study_real.jsonl

Embeds a stratified subsample of Fashion-MNIST once per backbone (cached on
disk by ``embed_dataset``: a re-run reads the embeddings in seconds), then runs
5 class-incremental tasks of 2 classes per seed. DKVB's keys are initialised
on the unlabeled training images before the stream (the paper's protocol).
The i.i.d. logistic regression (standardised features, all data at once) is
the bound users compare against. One JSON line per (backbone, method, seed).
"""

import argparse
import json
import os
import time
import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skdkvb import DKVBClassifier
from skdkvb.continual import class_incremental_split, evaluate_stream
from skdkvb.continual.baselines import NearestClassMean, StreamingLDA, make_linear_probe, make_mlp
from skdkvb.continual.datasets import embed_dataset, load_fashion_mnist
from skdkvb.encoders import convert_checkpoint

BACKBONES = {
    "mobilenet_v2": ("torchvision:mobilenet_v2", "SKDKVB_MOBILENET_V2_WEIGHTS"),
    "lite0": ("tf_efficientnet_lite0", "SKDKVB_LITE0_WEIGHTS"),
}

# What real embeddings need (see docs/results.md): PCA whitening then
# top-k counting; both keep the count decoders order-invariant.
DKVB_CONFIGS = {
    "DKVB (defaults)": {},
    "DKVB (pca-whiten 128, top_k=4)": dict(input_transform="pca-whiten", input_transform_components=128, top_k=4),
}


def methods(seed):
    out = {name: DKVBClassifier(device="cpu", random_state=seed, **kw) for name, kw in DKVB_CONFIGS.items()}
    out.update({
        "SLDA (shrinkage=auto)": StreamingLDA(shrinkage="auto"),
        "NCM": NearestClassMean(),
        "linear probe": make_linear_probe(random_state=seed),
        "MLP": make_mlp(random_state=seed),
    })  # fmt: skip
    return out


def checkpoint_for(backbone, cache_dir):
    encoder, env = BACKBONES[backbone]
    path = os.environ.get(env)
    if not path:
        raise SystemExit(f"{env} is not set: run `source .ci/weights.sh` first.")
    if backbone == "lite0":  # foreign key names: convert once (by order, shapes checked)
        converted = os.path.join(cache_dir, "tf_efficientnet_lite0.safetensors")
        if not os.path.isfile(converted):
            convert_checkpoint(path, encoder, converted)
        path = converted
    return encoder, path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--subsample", type=int, default=3000)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    args = p.parse_args()
    weights_dir = os.environ.get("SKDKVB_WEIGHTS_DIR", os.path.expanduser("~/.cache/skdkvb/weights"))
    raw = load_fashion_mnist()
    for backbone in args.backbones:
        encoder, path = checkpoint_for(backbone, weights_dir)
        data = embed_dataset(raw, encoder=encoder, checkpoint_path=path, image_size=args.image_size,
                             subsample=args.subsample, device="cpu", verbose=False)  # fmt: skip
        print(json.dumps({"backbone": backbone, "embed_time": round(data.embed_time, 1),
                          "cache_hit": data.cache_hit, "n_train": len(data.y_train)}), flush=True)  # fmt: skip
        Xtr, ytr, Xte, yte = data.X_train, data.y_train, data.X_test, data.y_test
        for seed in args.seeds:
            stream = class_incremental_split(Xtr, ytr, n_tasks=5, random_state=seed)
            for name, est in methods(seed).items():
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", category=UserWarning)
                    rep = evaluate_stream(est, stream, Xte, yte, X_unlabeled=Xtr, name=name, random_state=seed)
                print(json.dumps({"backbone": backbone, "method": name, "seed": seed,
                                  "final_accuracy": rep.final_accuracy, "average_accuracy": rep.average_accuracy,
                                  "time": round(time.perf_counter() - t0, 1)}), flush=True)  # fmt: skip
            for C in (1.0, 0.1):
                iid = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
                rng = np.random.default_rng(seed)
                order = rng.permutation(len(ytr))
                iid.fit(Xtr[order], ytr[order])
                acc = float((iid.predict(Xte) == yte).mean())
                print(json.dumps({"backbone": backbone, "method": f"i.i.d. logistic regression (C={C})", "seed": seed,
                                  "final_accuracy": acc}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
