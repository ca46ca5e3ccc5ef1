"""Class-incremental benchmark: DKVB against the continual-learning baselines.

Run ``python -m skdkvb.benchmark`` (Split-Fashion-MNIST, 5 tasks x 2 classes)
or ``python -m skdkvb.benchmark --dataset digits --seeds 5 --plot results.png``.

Protocol (the DKVB paper's, on raw pixels instead of frozen-encoder
embeddings): the training set is standardised (``StandardScaler`` fitted on
the training inputs, labels unused) and split into tasks of 2 classes in a
class order shuffled per seed; learners see the tasks one after the other,
with no task identity, and are scored on the whole test set after every task.
DKVB's keys are initialised beforehand on the training inputs without labels
(``fit_keys``), as the paper initialises keys on unlabeled data. The i.i.d.
upper bound trains the same DKVB on the shuffled union in one step.

Methods (``--methods``):

``dkvb``
    :class:`~skdkvb.DKVBClassifier` with the per-dataset configuration of
    :data:`DKVB_CONFIGS` (count decoder ``logp``, one pass).
``dkvb-sgd``
    The paper's trained-values decoder (``decoder="sgd"``), same keys.
``dkvb-iid``
    ``dkvb`` trained on the i.i.d. shuffle of the same data (upper bound).
``linear``, ``mlp``
    ``SGDClassifier(loss="log_loss")`` and ``MLPClassifier((128,))`` updated
    with ``partial_fit``, :data:`BASELINE_EPOCHS` epochs per task.
``ncm``, ``slda``
    :class:`~skdkvb.continual.baselines.NearestClassMean` and
    :class:`~skdkvb.continual.baselines.StreamingLDA`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from sklearn.preprocessing import StandardScaler

from .continual.baselines import NearestClassMean, StreamingLDA, make_linear_probe, make_mlp
from .continual import evaluate_seeds, summarize
from .continual.datasets import FashionMNISTNotFoundError, load_dataset

__all__ = ["BASELINE_EPOCHS", "DKVB_CONFIGS", "METHODS", "main", "make_method", "run"]

#: DKVB configuration per dataset (chosen by the study in docs/results.md).
DKVB_CONFIGS = {
    "fashion-mnist": dict(n_heads=128, n_keys=2048, key_dim=14, decoder="logp",
                          input_transform="pca-whiten", key_init_epochs=2),
    "digits": dict(n_heads=256, n_keys=1024, key_dim=14, decoder="logp",
                   key_init_epochs=10),
    "toy": dict(n_heads=20, n_keys=20, key_dim=2, decoder="logp",
                key_init_epochs=10),
}  # fmt: skip

#: Smaller DKVB settings used by ``--quick``.
QUICK_OVERRIDES = {
    "fashion-mnist": dict(n_heads=32, n_keys=512, key_init_epochs=1),
    "digits": dict(n_heads=64, n_keys=256),
    "toy": dict(),
}

#: ``partial_fit`` epochs per task for the linear probe and the MLP: enough
#: for each to learn the current task (R[t, t] high) before the next arrives.
BASELINE_EPOCHS = {"fashion-mnist": 5, "digits": 20, "toy": 20}

METHODS = ("dkvb", "dkvb-sgd", "dkvb-iid", "linear", "mlp", "ncm", "slda")
DEFAULT_METHODS = ("dkvb", "dkvb-iid", "linear", "mlp", "ncm", "slda")

_LABELS = {
    "dkvb": "DKVB", "dkvb-sgd": "DKVB (sgd decoder)", "dkvb-iid": "DKVB i.i.d. bound",
    "linear": "linear probe", "mlp": "MLP (128)", "ncm": "NCM", "slda": "SLDA",
}  # fmt: skip


def dkvb_config(dataset, *, quick=False):
    """The DKVB keyword arguments the benchmark uses for ``dataset``."""
    config = dict(DKVB_CONFIGS[dataset])
    if quick:
        config.update(QUICK_OVERRIDES[dataset])
    # logp's temperature is the estimator's "auto" rule (C * k / 4), which
    # calibrates the summed per-head log-likelihoods (docs/results.md).
    return config


def make_method(method, dataset, *, quick=False, device="auto"):
    """A factory ``seed -> estimator`` and the runner options for a method.

    Returns
    -------
    factory : callable
    options : dict
        Extra keyword arguments for :func:`~skdkvb.continual.evaluate_seeds`.
    """
    if method.startswith("dkvb"):
        from ._classifier import DKVBClassifier

        config = dkvb_config(dataset, quick=quick)
        if method == "dkvb-sgd":
            # The paper's decoder needs several epochs per task to move its
            # values away from zero (it uses up to 2000).
            config.update(decoder="sgd", partial_fit_epochs=5 if quick else 20)
        options = {"iid": method == "dkvb-iid"}

        def factory(seed):
            return DKVBClassifier(**config, device=device, random_state=seed)

        return factory, options
    if method == "linear":
        return (lambda seed: make_linear_probe(random_state=seed)), {
            "epochs": BASELINE_EPOCHS[dataset]
        }
    if method == "mlp":
        return (lambda seed: make_mlp(random_state=seed)), {"epochs": BASELINE_EPOCHS[dataset]}
    if method == "ncm":
        return (lambda seed: NearestClassMean()), {}
    if method == "slda":
        return (lambda seed: StreamingLDA()), {}
    raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")


def run(dataset="fashion-mnist", *, methods=DEFAULT_METHODS, seeds=1, quick=False,
        device="auto", data_dir=None, verbose=0, log=None):  # fmt: skip
    """Run the benchmark and return the list of reports.

    Parameters
    ----------
    dataset : {"fashion-mnist", "digits", "toy"}, default="fashion-mnist"
    methods : sequence of str, default=DEFAULT_METHODS
    seeds : int, default=1
        Seeds ``0 .. seeds - 1``; each shuffles the class order.
    quick : bool, default=False
        Small Fashion-MNIST subset and smaller DKVB (a seconds-long run).
    device : str, default="auto"
    data_dir : path-like, default=None
        Folder of the Fashion-MNIST IDX files.
    verbose : int, default=0
    log : callable, default=None
        Called with a progress line per method.

    Returns
    -------
    list of ContinualReport
    """
    data = load_dataset(dataset, quick=quick, data_dir=data_dir)
    scaler = StandardScaler().fit(data.X_train)
    X_train = scaler.transform(data.X_train).astype(np.float32)
    X_test = scaler.transform(data.X_test).astype(np.float32)
    y_train, y_test = data.y_train, data.y_test
    n_tasks = 4 if dataset == "toy" else 5
    class_order = "random"
    if dataset == "toy":
        from .continual.datasets import TOY_2D_CLASS_ORDER

        class_order = list(TOY_2D_CLASS_ORDER)
    reports = []
    for method in methods:
        factory, options = make_method(method, dataset, quick=quick, device=device)
        t0 = time.perf_counter()
        reports += evaluate_seeds(
            factory, X_train, y_train, X_test, y_test, seeds=range(seeds),
            n_tasks=n_tasks, class_order=class_order, name=_LABELS[method],
            X_unlabeled=X_train, verbose=verbose, **options,
        )  # fmt: skip
        if log is not None:
            log(f"  {_LABELS[method]:<20} done in {time.perf_counter() - t0:6.1f} s")
    return reports


def format_table(rows):
    """Markdown table of :func:`~skdkvb.continual.summarize` rows."""

    def pm(row, key, digits=3):
        m, s = row[f"{key}_mean"], row[f"{key}_std"]
        if not np.isfinite(m):
            return "–"
        return f"{m:.{digits}f} ± {s:.{digits}f}"

    lines = [
        "| method | avg accuracy | forgetting | BWT | log-loss | ECE | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {pm(row, 'average_accuracy')} | {pm(row, 'forgetting')} "
            f"| {pm(row, 'backward_transfer')} | {pm(row, 'log_loss', 2)} "
            f"| {pm(row, 'ece')} | {pm(row, 'total_time', 1)} |"
        )
    return "\n".join(lines)


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m skdkvb.benchmark",
        description="Class-incremental benchmark: DKVB vs linear probe, MLP, NCM, "
        "Streaming LDA and DKVB's i.i.d. upper bound.",
    )
    p.add_argument("--dataset", default="fashion-mnist",
                   choices=["fashion-mnist", "digits", "toy"],
                   help="default: fashion-mnist (Split-FMNIST, 5 tasks x 2 classes)")
    p.add_argument("--seeds", type=int, default=1,
                   help="number of seeds (class orders), 0..N-1; default 1")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--quick", action="store_true",
                   help="seconds-long run: FMNIST subset, smaller DKVB")
    p.add_argument("--plot", metavar="PNG", help="save accuracy matrices + curves here")
    p.add_argument("--json", metavar="PATH", help="write all reports and the summary here")
    p.add_argument("--device", default="auto", help="DKVB device: auto, cpu or cuda")
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--fallback", action="store_true",
                   help="use digits when the Fashion-MNIST files are missing")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="progress bars per task")  # fmt: skip
    return p


def main(argv=None):
    """Entry point of ``python -m skdkvb.benchmark``; returns the exit code."""
    args = _parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        print(f"error: unknown method(s) {unknown}; choose from {', '.join(METHODS)}.",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.seeds < 1:
        print("error: --seeds must be >= 1.", file=sys.stderr)
        return 2
    dataset = args.dataset
    say = print
    header = (f"Class-incremental {dataset}, {args.seeds} seed(s)"
              f"{' (quick)' if args.quick else ''}; methods: {', '.join(methods)}")  # fmt: skip
    try:
        say(header)
        reports = run(dataset, methods=methods, seeds=args.seeds, quick=args.quick,
                      device=args.device, data_dir=args.data_dir, verbose=args.verbose,
                      log=say)  # fmt: skip
    except FashionMNISTNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if not args.fallback:
            print("Install it with `sudo apt-get install dataset-fashion-mnist`, or rerun "
                  "with --dataset digits (or --fallback).", file=sys.stderr)  # fmt: skip
            return 1
        print("Falling back to --dataset digits.", file=sys.stderr)
        dataset = "digits"
        reports = run(dataset, methods=methods, seeds=args.seeds, quick=args.quick,
                      device=args.device, verbose=args.verbose, log=say)  # fmt: skip
    rows = summarize(reports)
    say("")
    say(f"Final accuracy on all classes after the last task (mean ± std, {args.seeds} seed(s)):")
    say(format_table(rows))
    if args.json:
        payload = {"dataset": dataset, "seeds": args.seeds, "quick": args.quick,
                   "command": "python -m skdkvb.benchmark " + " ".join(sys.argv[1:] if argv is None else argv),
                   "dkvb_config": dkvb_config(dataset, quick=args.quick),
                   "summary": rows, "reports": [r.to_dict() for r in reports]}  # fmt: skip
        from .continual.evaluation import _jsonable

        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(_jsonable(payload), fh, indent=1)
        say(f"wrote {args.json}")
    if args.plot:
        from .continual.plotting import plot_benchmark

        fig = plot_benchmark(reports, title=f"Class-incremental {dataset} "
                             f"({args.seeds} seed(s))")  # fmt: skip
        fig.savefig(args.plot, dpi=120)
        say(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
