"""DKVB on real pretrained embeddings: Split-Fashion-MNIST through MobileNetV2 and EfficientNet-Lite0 (docs/results.md).

Usage: source .ci/weights.sh && python benchmarks/study_real.py [--subsample 3000] [--image-size 112]
       [--seeds 0 1 2] [--full-test] > study_real.jsonl
       python benchmarks/study_real.py --grid > grid.jsonl   (the validation study of DKVB's settings)

``--full-test`` scores on all 10,000 test images instead of the 1,000 of the
subsample (same 3,000 training images; embedding the test set costs about 3
minutes per backbone on 2 cores, once): the 1,000-image test set has a
standard error of about 1.1 points, too coarse to rank methods 1 point apart.

``--grid`` is the study of what real embeddings need (docs/results.md): a
validation split carved from the training images (80/20, stratified, per
seed), keys fitted on the 80 % without labels, and every combination of
architecture, top-k, count smoothing, soft assignment and unsupervised head
weighting scored on the 20 %. The count-decoder variants are computed from
one key lookup per setting (a re-implementation of the ``logp`` decoder that
reproduces ``DKVBClassifier`` exactly for the plain variant).

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
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from skdkvb import DKVBClassifier
from skdkvb.continual import class_incremental_split, evaluate_stream
from skdkvb.continual.baselines import NearestClassMean, StreamingLDA, make_linear_probe, make_mlp
from skdkvb.continual.datasets import _subset, embed_dataset, load_fashion_mnist
from skdkvb.encoders import convert_checkpoint, dkvb_params_for_embeddings

BACKBONES = {
    "mobilenet_v2": ("torchvision:mobilenet_v2", "SKDKVB_MOBILENET_V2_WEIGHTS"),
    "lite0": ("tf_efficientnet_lite0", "SKDKVB_LITE0_WEIGHTS"),
}

# What real embeddings need (see docs/results.md): many heads, PCA whitening, then
# top-k counting; all keep the count decoders order-invariant.
DKVB_CONFIGS = {
    "DKVB (defaults)": {},
    "DKVB (former preset: 256 x 4096, pca-whiten 128, top_k=4)": dict(
        input_transform="pca-whiten", input_transform_components=128, top_k=4
    ),
    "DKVB (embedding preset: 1024 x 1024, pca-whiten 256, top_k=4)": dkvb_params_for_embeddings(),
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


def final_accuracy(est, stream, X_test, y_test, X_unlabeled):
    """The stream of ``evaluate_stream`` (keys on the unlabeled images, one ``partial_fit`` per task), scored once."""
    if hasattr(est, "fit_keys"):
        est.fit_keys(X_unlabeled)
    classes = np.unique(np.concatenate([np.asarray(c) for c in stream.task_classes]))
    for X, y in stream.steps:
        est.partial_fit(X, y, classes=classes)
    return float(est.score(X_test, y_test))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--subsample", type=int, default=3000)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    p.add_argument("--full-test", action="store_true", help="score on all 10,000 test images")
    p.add_argument("--grid", action="store_true", help="the validation study of DKVB's settings")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only the methods whose name starts with one of these")
    args = p.parse_args()
    weights_dir = os.environ.get("SKDKVB_WEIGHTS_DIR", os.path.expanduser("~/.cache/skdkvb/weights"))
    raw = load_fashion_mnist()
    for backbone in args.backbones:
        encoder, path = checkpoint_for(backbone, weights_dir)
        source, subsample = raw, args.subsample
        if args.full_test:  # the same training subset (same bytes: a cache hit), the whole test set
            source = type(raw)(**raw)
            source.X_train, source.y_train = _subset(raw.X_train, raw.y_train, args.subsample, 0)
            subsample = None
        data = embed_dataset(source, encoder=encoder, checkpoint_path=path, image_size=args.image_size,
                             subsample=subsample, device="cpu", verbose=False)  # fmt: skip
        if args.grid:
            validation_grid(backbone, data.X_train, data.y_train, args.seeds)
            continue
        print(json.dumps({"backbone": backbone, "embed_time": round(data.embed_time, 1),
                          "cache_hit": data.cache_hit, "n_train": len(data.y_train)}), flush=True)  # fmt: skip
        Xtr, ytr, Xte, yte = data.X_train, data.y_train, data.X_test, data.y_test
        for seed in args.seeds:
            stream = class_incremental_split(Xtr, ytr, n_tasks=5, random_state=seed)
            for name, est in methods(seed).items():
                if args.only and not name.startswith(tuple(args.only)):
                    continue
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", category=UserWarning)
                    if args.full_test:  # the final model only: scoring 10,000 images after every task is slow
                        final = {"final_accuracy": final_accuracy(est, stream, Xte, yte, Xtr)}
                    else:
                        rep = evaluate_stream(est, stream, Xte, yte, X_unlabeled=Xtr, name=name, random_state=seed)
                        final = {"final_accuracy": rep.final_accuracy, "average_accuracy": rep.average_accuracy}
                print(json.dumps({"backbone": backbone, "method": name, "seed": seed, "n_test": len(yte), **final,
                                  "time": round(time.perf_counter() - t0, 1)}), flush=True)  # fmt: skip
            for C in (1.0, 0.1):
                iid = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
                rng = np.random.default_rng(seed)
                order = rng.permutation(len(ytr))
                with threadpool_limits(1, user_api="blas"):  # small problem: threads only cost (benchmark.py)
                    iid.fit(Xtr[order], ytr[order])
                acc = float((iid.predict(Xte) == yte).mean())
                print(json.dumps({"backbone": backbone, "method": f"i.i.d. logistic regression (C={C})", "seed": seed,
                                  "final_accuracy": acc}), flush=True)  # fmt: skip


# ----------------------------------------------------------- the validation grid
GRID_ARCHS = [dict(n_heads=256, n_keys=4096, input_transform_components=128),  # the preset (estimator defaults)
              dict(n_heads=256, n_keys=1024, input_transform_components=128),
              dict(n_heads=128, n_keys=2048, input_transform_components=128, key_init_epochs=2),  # the CLI's
              dict(n_heads=256, n_keys=1024, input_transform_components=64),
              dict(n_heads=256, n_keys=1024, input_transform_components=192),
              dict(n_heads=512, n_keys=512, input_transform_components=128),
              dict(n_heads=256, n_keys=256, input_transform_components=128)]  # fmt: skip
GRID_TOP_K = [1, 2, 4, 8, 16]
GRID_SMOOTHING = [0.03, 0.1, 0.3, 1.0]
#: Soft assignment: each selected key counts with a weight. ``rank``: 1 / rank**t;
#: ``dist``: exp(-(d_j - d_1) / (t * (d_k - d_1))), d the squared distances; both rescaled to sum to k.
GRID_SOFT = [None, ("rank", 0.5), ("rank", 1.0), ("dist", 0.5), ("dist", 1.0)]


def _nearest(q, keys, k, valid=None):
    """Top-k keys per head and their squared distances, nearest first: (n, C, k) each."""
    from skdkvb._search import key_scores_bias, nearest_keys

    idx = nearest_keys(q, keys, key_scores_bias(keys, valid), top_k=k).long()
    sel = keys[torch.arange(keys.shape[0]).view(1, -1, 1), idx]
    d2, order = ((q.unsqueeze(2) - sel) ** 2).sum(-1).sort(-1)
    return idx.gather(-1, order), d2


def _soft_weights(d2, soft):
    k = d2.shape[-1]
    if soft is None:
        return torch.ones_like(d2)
    kind, t = soft
    if kind == "rank":
        w = 1.0 / torch.arange(1, k + 1, dtype=d2.dtype) ** t
        return (w * k / w.sum()).expand_as(d2)
    rel, gap = d2 - d2[..., :1], (d2[..., -1:] - d2[..., :1]).clamp_min(1e-6)
    w = torch.exp(-rel / (t * gap))
    return w / w.sum(-1, keepdim=True) * k


def _head_weights(clf, Xa):
    """Unsupervised per-head weights (mean 1): key-usage entropy, inverse relative distortion."""
    keys = clf.bottleneck_.keys.float()
    C, M = keys.shape[:2]
    q = clf._queries(torch.as_tensor(Xa, dtype=torch.float32))
    idx, d2 = _nearest(q, keys, 1)
    cnt = torch.zeros(C, M, dtype=torch.float64).scatter_add_(
        1, idx[:, :, 0].T.contiguous(), torch.ones(C, len(Xa), dtype=torch.float64))  # fmt: skip
    p = cnt / cnt.sum(1, keepdim=True)
    ent = (-(p * p.clamp_min(1e-30).log()).sum(1)).float()
    inv = 1 / (d2[:, :, 0].mean(0) / (q * q).sum(-1).mean(0).clamp_min(1e-12))
    return {"none": None, "entropy": ent / ent.mean(), "inv-distortion": inv / inv.mean()}


def validation_grid(backbone, X, y, seeds, n_classes=10):
    """One JSON line per (architecture, seed, top-k, smoothing, soft, head weighting): validation accuracy."""
    from sklearn.model_selection import train_test_split

    for ai, arch in enumerate(GRID_ARCHS):
        for seed in seeds:
            a, b = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=100 + seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=UserWarning)
                clf = DKVBClassifier(device="cpu", random_state=seed, input_transform="pca-whiten", **arch).fit_keys(
                    X[a]
                )
            keys = clf.bottleneck_.keys.float()
            C, M = keys.shape[:2]
            with torch.no_grad():
                qa = clf._queries(torch.as_tensor(X[a], dtype=torch.float32))
                qb = clf._queries(torch.as_tensor(X[b], dtype=torch.float32))
                heads = _head_weights(clf, X[a])
                ia_all, da_all = _nearest(qa, keys, max(GRID_TOP_K))
                for k in GRID_TOP_K:
                    flat = (ia_all[..., :k] + torch.arange(C).view(1, -1, 1) * M).reshape(-1)
                    ya = torch.as_tensor(y[a]).view(-1, 1).expand(len(a), C * k).reshape(-1)
                    valid = None
                    for soft in GRID_SOFT:
                        w = _soft_weights(da_all[..., :k], soft)
                        counts = torch.zeros(C * M, n_classes, dtype=torch.float64)
                        counts.index_put_((flat, ya), w.reshape(-1).double(), accumulate=True)
                        if valid is None:  # prune_unused_keys: never-trained keys are not selectable
                            valid = (counts.sum(1) > 0).view(C, M)
                            valid = valid | ~valid.any(1, keepdim=True)
                            ib, db = _nearest(qb, keys, k, valid)
                            flatb = (ib + torch.arange(C).view(1, -1, 1) * M).reshape(-1)
                        wb = _soft_weights(db, soft)
                        for s in GRID_SMOOTHING:
                            logf = ((counts + s) / (counts.sum(1, keepdim=True) + n_classes * s)).log().float()
                            per_head = (logf[flatb].view(len(b), C, k, n_classes) * wb.unsqueeze(-1)).sum(2)
                            for hname, hw in heads.items():
                                score = per_head if hw is None else per_head * hw.view(1, C, 1)
                                acc = float((score.sum(1).argmax(1).numpy() == y[b]).mean())
                                print(json.dumps({"backbone": backbone, "arch": ai, **arch, "seed": seed, "top_k": k,
                                                  "count_smoothing": s, "soft": soft, "head_weights": hname,
                                                  "val_accuracy": acc}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
