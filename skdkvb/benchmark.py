"""The class-incremental benchmark CLI (``python -m skdkvb.benchmark``): DKVB against the baselines and i.i.d. bounds.

Run ``python -m skdkvb.benchmark`` (Split-Fashion-MNIST, 5 tasks x 2 classes,
3 seeds, outputs in ``results/``) or ``python -m skdkvb.benchmark --dataset
digits --seeds 5``. With ``--encoder NAME --checkpoint FILE`` the images go
through a frozen pretrained backbone first (the paper's setting).

Protocol (the DKVB paper's): the training set is standardised
(``StandardScaler`` fitted on the training inputs, labels unused) and split
into tasks of 2 classes in a class order shuffled per seed; learners see the
tasks one after the other, with no task identity, and are scored on the whole
held-out test set after every task. DKVB's keys are initialised beforehand on
the training inputs without labels (``fit_keys``), as the paper initialises
keys on unlabeled data. The i.i.d. upper bounds train on the shuffled union of
all tasks in one step.

Methods (``--methods``):

``dkvb``
    :class:`~skdkvb.DKVBClassifier` with the per-dataset configuration of
    :data:`DKVB_CONFIGS` (count decoder ``logp``, one pass).
``dkvb-sgd``
    The paper's trained-values decoder (``decoder="sgd"``), same keys.
``dkvb-iid``
    ``dkvb`` trained on the i.i.d. shuffle of the same data (upper bound).
``iid-logreg``
    ``StandardScaler`` + ``LogisticRegression(max_iter=100)`` (lbfgs) trained
    on all tasks at once: the i.i.d. joint-training bound users compare
    against (upper bound). 100 iterations, not convergence: on raw
    Fashion-MNIST more iterations overfit (test accuracy 0.844 after 100,
    0.837 after 300), so the convergence warning is silenced.
``linear``, ``mlp``
    ``SGDClassifier(loss="log_loss")`` and ``MLPClassifier((128,))`` updated
    with ``partial_fit``, :data:`BASELINE_EPOCHS` epochs per task.
``ncm``, ``slda``
    :class:`~skdkvb.continual.baselines.NearestClassMean` and
    :class:`~skdkvb.continual.baselines.StreamingLDA`.

Everything that can be checked before working is checked while parsing the
arguments (output paths, optional imports, the device, the data folder), so a
mistake costs one line of error, not a finished run. torch is imported only
after the arguments are parsed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "BASELINE_EPOCHS",
    "DEFAULT_METHODS",
    "DEFAULT_SEEDS",
    "DKVB_CONFIGS",
    "ENCODER_EXTRA_METHODS",
    "METHODS",
    "dkvb_config",
    "format_table",
    "main",
    "make_method",
    "run",
]

#: DKVB configuration per dataset (chosen by the study in docs/results.md).
#: ``"embedded"`` is used for any dataset embedded by ``--encoder``.
DKVB_CONFIGS = {
    "fashion-mnist": dict(n_heads=128, n_keys=2048, key_dim=14, decoder="logp",
                          input_transform="pca-whiten", key_init_epochs=2),
    "digits": dict(n_heads=256, n_keys=1024, key_dim=14, decoder="logp",
                   key_init_epochs=10),
    "toy": dict(n_heads=20, n_keys=20, key_dim=2, decoder="logp",
                key_init_epochs=10),
    # Real embeddings: the estimator's preset for them (docs/results.md,
    # skdkvb.encoders.dkvb_params_for_embeddings) at a quarter of its key rows and half its
    # components, so that a cached CLI run stays under a minute: 128 heads of 2048 keys,
    # pca-whiten 128, top-4. In 5-fold validation at 224 px it scored 0.851 on both backbones,
    # against 0.847-0.858 for 512 or 1024 heads of 1024 keys, whose cached runs take 1.9 and 3.3
    # times as long (28 s and 51 s against 15 s, one session).
    "embedded": dict(n_heads=128, n_keys=2048, key_dim=14, decoder="logp", top_k=4,
                     input_transform="pca-whiten", input_transform_components=128, key_init_epochs=2),
}  # fmt: skip

#: Smaller DKVB settings used by ``--quick``.
QUICK_OVERRIDES = {
    "fashion-mnist": dict(n_heads=32, n_keys=512, key_init_epochs=1),
    "digits": dict(n_heads=64, n_keys=256),
    "toy": dict(),
    "embedded": dict(n_heads=32, n_keys=512, key_init_epochs=1),
}

#: ``partial_fit`` epochs per task for the linear probe and the MLP: enough
#: for each to learn the current task (R[t, t] high) before the next arrives.
BASELINE_EPOCHS = {"fashion-mnist": 5, "digits": 20, "toy": 20, "embedded": 5}

METHODS = ("dkvb", "dkvb-sgd", "dkvb-iid", "iid-logreg", "linear", "mlp", "ncm", "slda")
DEFAULT_METHODS = ("dkvb", "linear", "mlp", "ncm", "slda")
#: Added to the defaults with ``--encoder``: the two i.i.d. bounds, cheap on embeddings, which
#: cost more than a third of the default run on raw Fashion-MNIST pixels.
ENCODER_EXTRA_METHODS = ("dkvb-iid", "iid-logreg")
#: Default number of seeds: 3 keeps the default run near a minute on 2 cores.
DEFAULT_SEEDS = 3
DATASETS = ("fashion-mnist", "digits", "toy")

_LABELS = {
    "dkvb": "DKVB", "dkvb-sgd": "DKVB (sgd decoder)", "dkvb-iid": "DKVB i.i.d. (upper bound)",
    "iid-logreg": "logistic regression i.i.d. (upper bound)",
    "linear": "linear probe", "mlp": "MLP (128)", "ncm": "NCM", "slda": "SLDA",
}  # fmt: skip

_PLOT_HINT = 'plotting needs matplotlib: pip install "skdkvb[plot]" (or pass --no-plot)'
_FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")  # fmt: skip

TIME_CAPTION = (
    "time: wall seconds per seed for key initialisation, training and the evaluation on the test set after every task"
)


def dkvb_config(dataset: str, *, quick: bool = False) -> dict[str, Any]:
    """The DKVB keyword arguments the benchmark uses for ``dataset``.

    Parameters
    ----------
    dataset : {"fashion-mnist", "digits", "toy", "embedded"}
        The data set (``"embedded"``: any data set run through ``--encoder``).
    quick : bool, default=False
        Apply the smaller ``--quick`` settings.

    Returns
    -------
    config : dict
        Keyword arguments of :class:`~skdkvb.DKVBClassifier`.

    Examples
    --------
    >>> from skdkvb.benchmark import dkvb_config
    >>> dkvb_config("digits")["n_keys"], dkvb_config("digits", quick=True)["n_keys"]
    (1024, 256)
    """
    config = dict(DKVB_CONFIGS[dataset])
    if quick:
        config.update(QUICK_OVERRIDES[dataset])
    # logp's temperature is the estimator's "auto" rule (C * k / 4), which
    # calibrates the summed per-head log-likelihoods (docs/results.md).
    return config


def make_method(
    method: str, dataset: str, *, quick: bool = False, device: str = "auto", verbose: int = 0
) -> tuple[Callable[[int], Any], dict[str, Any]]:
    """A factory ``seed -> estimator`` and the runner options for a method.

    Parameters
    ----------
    method : str
        One of :data:`METHODS`.
    dataset : {"fashion-mnist", "digits", "toy", "embedded"}
        Selects the DKVB configuration and the baselines' epochs per task.
    quick : bool, default=False
        Smaller DKVB (``--quick``).
    device : str, default="auto"
        DKVB's device.
    verbose : int, default=0
        DKVB's ``verbose`` (progress bars of key initialisation).

    Returns
    -------
    factory : callable
        ``factory(seed)`` returns a fresh, unfitted estimator.
    options : dict
        Extra keyword arguments for :func:`~skdkvb.continual.evaluate_seeds`.

    Examples
    --------
    >>> from skdkvb.benchmark import make_method
    >>> factory, options = make_method("iid-logreg", "digits")
    >>> options
    {'iid': True}
    """
    if method.startswith("dkvb"):
        from ._classifier import DKVBClassifier

        config = dkvb_config(dataset, quick=quick)
        if method == "dkvb-sgd":
            # The paper's decoder needs several epochs per task to move its
            # values away from zero (it uses up to 2000).
            config.update(decoder="sgd", partial_fit_epochs=5 if quick else 20)

        def factory(seed):
            return DKVBClassifier(**config, device=device, random_state=seed, verbose=verbose)

        return factory, {"iid": method == "dkvb-iid"}
    from .continual.baselines import NearestClassMean, StreamingLDA, make_linear_probe, make_mlp

    if method == "iid-logreg":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return (lambda seed: make_pipeline(StandardScaler(), LogisticRegression(max_iter=100))), {"iid": True}
    if method == "linear":
        return (lambda seed: make_linear_probe(random_state=seed)), {"epochs": BASELINE_EPOCHS[dataset]}
    if method == "mlp":
        return (lambda seed: make_mlp(random_state=seed)), {"epochs": BASELINE_EPOCHS[dataset]}
    if method == "ncm":
        return (lambda seed: NearestClassMean()), {}
    if method == "slda":
        # On embeddings (few samples per feature) the fixed 1e-4 shrinkage is far too small;
        # "auto" (OAS on the running covariance) keeps the baseline fair there.
        shrinkage = "auto" if dataset == "embedded" else 1e-4
        return (lambda seed: StreamingLDA(shrinkage=shrinkage)), {}
    raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")


# --------------------------------------------------------------------- progress
class _Progress:
    """Progress output: tqdm bars on a terminal, plain lines otherwise, nothing when quiet.

    A heartbeat thread keeps the output alive: on a terminal it refreshes the
    current bar every half second (its clock moves even while a long step
    runs); in a log it prints a ``...`` line after 3 s of silence.
    """

    def __init__(self, mode: str, stream: TextIO | None = None, silence: float = 3.0) -> None:
        self.mode = mode
        self.stream = stream if stream is not None else sys.stderr
        self.silence = silence
        self.bar = None
        self.what = ""
        self.stage_start = self.last = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if mode != "off":
            self._thread = threading.Thread(target=self._beat, name="skdkvb-progress", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                if self.mode == "bar" and self.bar is not None:
                    self.bar.refresh()
                elif self.mode == "lines" and time.perf_counter() - self.last > self.silence and self.what:
                    self._line(f"  ... {self.what} ({time.perf_counter() - self.stage_start:.0f} s)")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
        self.last = time.perf_counter()

    def note(self, text: str) -> None:
        """One line of progress (above the bar on a terminal)."""
        if self.mode == "off":
            return
        with self._lock:
            if self.bar is not None:
                self.bar.write(text, file=self.stream)
                self.last = time.perf_counter()
            else:
                self._line(text)

    def open(self, desc: str, total: int | None = None, unit: str = "task", announce: bool = True) -> None:
        """Start a new stage (a bar on a terminal, a line in a log unless ``announce`` is False)."""
        self.close()
        with self._lock:
            self.what = desc
            self.stage_start = time.perf_counter()
            if self.mode == "bar":
                from tqdm.auto import tqdm

                # A stage of unknown length shows its clock only (no "0step [?step/s]").
                fmt = None if total is not None else "{desc}: {elapsed}{postfix}"
                self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True,
                                leave=total is not None, bar_format=fmt)  # fmt: skip
            elif self.mode == "lines" and announce:
                self._line(f"{desc} ...")

    def update(self, status: str, n: int = 0) -> None:
        """Advance the current stage by ``n`` and describe what runs now."""
        with self._lock:
            self.what = f"{self.what.split(':')[0]}: {status}"
            if self.bar is not None:
                self.bar.set_postfix_str(status, refresh=False)
                self.bar.update(n)
                self.bar.refresh()

    def close(self, text: str | None = None) -> None:
        """End the current stage, with a closing line in a log."""
        with self._lock:
            if self.bar is not None:
                if text:
                    self.bar.set_postfix_str(text, refresh=False)
                self.bar.close()
                self.bar = None
            elif self.mode == "lines" and text:
                self._line(f"{self.what.split(':')[0]}: {text}")
            self.what = ""

    def stop(self) -> None:
        """Close the stage and stop the heartbeat."""
        self.close()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


# -------------------------------------------------------------------------- run
def _subsample(data: Any, n: int, random_state: int = 0) -> Any:
    """A stratified subset of ``n`` training and ``n // 3`` test samples."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    def cut(X, y, k):
        if k >= y.size:
            return X, y
        k = max(k, np.unique(y).size)
        idx, _ = train_test_split(np.arange(y.size), train_size=k, stratify=y, random_state=random_state)
        return X[idx], y[idx]

    out = dict(data)
    out["X_train"], out["y_train"] = cut(data.X_train, data.y_train, n)
    out["X_test"], out["y_test"] = cut(data.X_test, data.y_test, max(n // 3, 1))
    return type(data)(**out)


def run(
    dataset: str = "fashion-mnist",
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    seeds: int = DEFAULT_SEEDS,
    quick: bool = False,
    device: str = "auto",
    data_dir: str | os.PathLike | None = None,
    encoder: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    image_size: int | None = None,
    subsample: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    verbose: int = 0,
    progress: Any = None,
) -> list[Any]:
    """Run the benchmark and return one report per method and seed.

    Parameters
    ----------
    dataset : {"fashion-mnist", "digits", "toy"}, default="fashion-mnist"
        The stream: 5 tasks of 2 classes (4 tasks for the toy).
    methods : sequence of str, default=DEFAULT_METHODS
        Subset of :data:`METHODS`.
    seeds : int, default=DEFAULT_SEEDS
        Seeds ``0 .. seeds - 1``; each shuffles the class order.
    quick : bool, default=False
        Small Fashion-MNIST subset and smaller DKVB (a seconds-long run).
    device : str, default="auto"
        DKVB's (and the encoder's) device.
    data_dir : path-like, default=None
        Folder of the Fashion-MNIST IDX files.
    encoder : str, default=None
        A frozen backbone (timm name or ``"torchvision:<name>"``) that embeds
        the images first, through
        ``skdkvb.continual.datasets.embed_dataset``.
    checkpoint : path-like, default=None
        Local weights file of ``encoder``.
    image_size : int, default=None
        Input resolution of ``encoder`` (its own default if None).
    subsample : int, default=None
        Keep a stratified subset of this many training samples (and a third
        as many test samples).
    cache_dir : path-like, default=None
        Folder of the embedding cache.
    verbose : int, default=0
        Progress bars of the estimators themselves (DKVB's key initialisation).
    progress : object, default=None
        Internal progress reporter of the CLI; None runs silently.

    Returns
    -------
    reports : list of ContinualReport
        In method order, seeds inner; ``report.extra["seconds"]`` is the wall
        time of that seed (key initialisation, training and evaluation).
    """
    import numpy as np
    from sklearn.preprocessing import StandardScaler

    from .continual.datasets import load_dataset

    progress = progress if progress is not None else _Progress("off")
    progress.open(f"loading {dataset}", unit="step")
    data = load_dataset(dataset, quick=quick, data_dir=data_dir)
    config_name = dataset
    if encoder is not None:
        from .continual.datasets import embed_dataset

        progress.close()
        progress.note(f"embedding {dataset} with {encoder} (cached in {cache_dir or 'the default cache'})")
        data = embed_dataset(data, encoder=encoder, checkpoint_path=checkpoint, image_size=image_size,
                             subsample=subsample, cache_dir=cache_dir, device=device,
                             verbose=int(progress.mode != "off") or verbose)  # fmt: skip
        config_name = "embedded"
    elif subsample is not None:
        data = _subsample(data, subsample)
    progress.update("standardising")
    scaler = StandardScaler().fit(data.X_train)
    X_train = scaler.transform(data.X_train).astype(np.float32)
    X_test = scaler.transform(data.X_test).astype(np.float32)
    y_train, y_test = data.y_train, data.y_test
    progress.close()
    n_tasks = 4 if dataset == "toy" else 5
    class_order: Any = "random"
    if dataset == "toy":
        from .continual.datasets import TOY_2D_CLASS_ORDER

        class_order = list(TOY_2D_CLASS_ORDER)
    reports = []
    with _blas_threads_for(X_train):
        for method in methods:
            reports.extend(_run_method(method, config_name, X_train, y_train, X_test, y_test, n_tasks=n_tasks,
                                       class_order=class_order, seeds=seeds, quick=quick, device=device,
                                       verbose=verbose, progress=progress))  # fmt: skip
    return reports


#: Below this many input numbers (samples x features) the baselines run with one BLAS thread.
SMALL_PROBLEM_SIZE = 2**23


def _blas_threads_for(X: Any) -> Any:
    """One BLAS thread for small problems (a context manager), the library's default otherwise.

    On a few thousand samples OpenBLAS's threads cost more than they save, and
    far more when the cores are shared: on 3,000 x 1,280 embeddings on 2 loaded
    cores, ``LogisticRegression`` took 0.8 s with one thread and 7.6 to 10 s
    with two. Large problems (the full Fashion-MNIST) keep every thread.
    """
    import contextlib

    if X.shape[0] * X.shape[1] >= SMALL_PROBLEM_SIZE:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _run_method(method, config_name, X_train, y_train, X_test, y_test, *, n_tasks, class_order, seeds, quick,
                device, verbose, progress) -> list[Any]:  # fmt: skip
    """Every seed of one method: a list of reports (one per seed)."""
    import numpy as np
    from sklearn.exceptions import ConvergenceWarning

    from .continual import evaluate_seeds

    reports = []
    factory, options = make_method(method, config_name, quick=quick, device=device, verbose=verbose)
    iid = options.get("iid", False)
    steps = 1 if iid else n_tasks
    label = _LABELS[method]
    progress.open(label, total=seeds * steps)
    seconds = []
    for seed in range(seeds):
        where = f"seed {seed + 1}/{seeds}"
        progress.update(f"{where}, {'key init + ' if method.startswith('dkvb') else ''}task 1/{steps}")

        def step_done(t, est, where=where, steps=steps):
            nxt = f", task {t + 2}/{steps}" if t + 1 < steps else ", scoring"
            progress.update(f"{where}{nxt}", n=1)

        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # iid-logreg stops at 100 lbfgs iterations on purpose (see the module docstring).
            warnings.filterwarnings("ignore", category=ConvergenceWarning)
            (report,) = evaluate_seeds(
                factory, X_train, y_train, X_test, y_test, seeds=[seed], n_tasks=n_tasks,
                class_order=class_order, name=label, X_unlabeled=X_train, callback=step_done, **options,
            )  # fmt: skip
            report.extra["seconds"] = time.perf_counter() - t0
            seconds.append(report.extra["seconds"])
        reports.append(report)
    progress.close(f"{np.mean(seconds):.1f} s per seed")
    return reports


# ------------------------------------------------------------------------ table
def _summary_rows(reports: Sequence[Any]) -> list[dict[str, Any]]:
    import numpy as np

    from .continual import summarize

    rows = summarize(reports)
    for row in rows:
        secs = np.array([r.extra.get("seconds", r.total_time) for r in reports if r.name == row["method"]])
        row["seconds_mean"], row["seconds_std"] = float(secs.mean()), float(secs.std())
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the benchmark's summary rows.

    Parameters
    ----------
    rows : sequence of dict
        :func:`~skdkvb.continual.summarize` rows, optionally with
        ``seconds_mean`` / ``seconds_std`` (wall seconds per seed; the
        reports' ``total_time`` is shown otherwise).

    Returns
    -------
    table : str
        A Markdown table; ``mean ± std`` where a row has several seeds, the
        mean alone where it has one (one seed has no spread).

    Examples
    --------
    >>> from skdkvb.benchmark import format_table
    >>> row = {"method": "m", "n_seeds": 1, "average_accuracy_mean": 0.5, "average_accuracy_std": 0.0}
    >>> print(format_table([row]).splitlines()[-1])
    | m | 0.500 | – | – | – | – | – |
    """
    import math

    def pm(row, key, digits=3):
        m, s = row.get(f"{key}_mean", float("nan")), row.get(f"{key}_std", float("nan"))
        if m is None or not math.isfinite(m):
            return "–"
        if row.get("n_seeds", 1) < 2:
            return f"{m:.{digits}f}"
        return f"{m:.{digits}f} ± {s:.{digits}f}"

    lines = [
        "| method | avg accuracy | forgetting | BWT | log-loss | ECE | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        time_key = "seconds" if "seconds_mean" in row else "total_time"
        lines.append(
            f"| {row['method']} | {pm(row, 'average_accuracy')} | {pm(row, 'forgetting')} "
            f"| {pm(row, 'backward_transfer')} | {pm(row, 'log_loss', 2)} "
            f"| {pm(row, 'ece')} | {pm(row, time_key, 1)} |"
        )
    return "\n".join(lines)


def _caption(dataset: str, seeds: int, encoder: str | None) -> str:
    spread = "1 seed: no spread (use --seeds 3 or more for a standard deviation)" if seeds == 1 else (
        f"mean ± std over {seeds} seeds (class orders)")  # fmt: skip
    features = f"{encoder} embeddings" if encoder else "raw inputs"
    return (
        f"Final accuracy on the held-out test set, all classes, after the last task ({dataset}, {features}); "
        f"{spread}. Forgetting and BWT are undefined (–) for the i.i.d. upper bounds. {TIME_CAPTION}."
    )


# -------------------------------------------------------------------------- CLI
def _check_writable_dir(parser: argparse.ArgumentParser, option: str, folder: Path, value: str) -> None:
    if not folder.is_dir():
        parser.error(f"argument {option}: folder {str(folder)!r} of {value!r} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"argument {option}: folder {str(folder)!r} of {value!r} is not writable")


def _output_path(out: Path, name: str) -> Path:
    """A bare file name goes into ``--out``; anything with a folder is a path."""
    path = Path(name).expanduser()
    return out / path if str(path.parent) == "." and not name.startswith(("./", ".\\")) else path


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every real default (not the None / False of unset options and flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, without the usage block."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m skdkvb.benchmark",
        description="Class-incremental benchmark: DKVB against a linear probe, an MLP, NCM, "
        "Streaming LDA and i.i.d. upper bounds, scored on the held-out test set after every task.",
        epilog=f"Methods: {', '.join(METHODS)}. {TIME_CAPTION}.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--dataset",
        default="fashion-mnist",
        choices=DATASETS,
        help="the stream (fashion-mnist: Split-FMNIST, 5 tasks x 2 classes)",
    )
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="number of seeds (class orders) 0..N-1")
    p.add_argument(
        "--methods",
        help=f"comma-separated subset of {','.join(METHODS)} (default: {','.join(DEFAULT_METHODS)}; "
        f"with --encoder also {','.join(ENCODER_EXTRA_METHODS)})",
    )
    p.add_argument("--quick", action="store_true", help="seconds-long run: FMNIST subset, smaller DKVB")
    p.add_argument(
        "--out",
        default="results",
        metavar="DIR",
        help="folder for the outputs (created if missing; its parent must exist)",
    )
    p.add_argument(
        "--plot", default="results.png", metavar="PNG", help="accuracy matrices + curves; a bare name goes into --out"
    )
    p.add_argument("--no-plot", action="store_true", help="write no figure (no matplotlib needed)")
    p.add_argument(
        "--json",
        default="results.json",
        metavar="PATH",
        help="all reports and the summary; a bare name goes into --out",
    )
    p.add_argument("--device", default="auto", help="DKVB's and the encoder's device: auto, cpu, cuda[:N]")
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder with the four Fashion-MNIST IDX files (if unset: $SKDKVB_FASHION_MNIST_DIR "
        "or /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--fallback", action="store_true", help="use digits when the Fashion-MNIST files are missing")
    g = p.add_argument_group("frozen pretrained encoder (the paper's setting)")
    g.add_argument(
        "--encoder",
        metavar="NAME",
        help="embed the images first with this backbone: a timm name or torchvision:<name>, "
        "e.g. torchvision:mobilenet_v2",
    )
    g.add_argument("--checkpoint", metavar="FILE", help="local weights file of --encoder (nothing is downloaded)")
    g.add_argument("--image-size", type=int, metavar="N", help="input resolution of --encoder (its default if unset)")
    g.add_argument(
        "--subsample", type=int, metavar="N", help="keep a stratified subset of N training and N/3 test samples"
    )
    g.add_argument("--cache-dir", metavar="DIR", help="folder of the embedding cache")
    q = p.add_mutually_exclusive_group()
    q.add_argument("-q", "--quiet", action="store_true", help="no progress output, only the table")
    q.add_argument("-v", "--verbose", action="count", default=0,
                   help="also the estimators' own progress bars when the output is not a terminal")  # fmt: skip
    return p


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that needs no work: one line of error (exit code 2) on failure."""
    if args.methods is None:
        args.methods = ",".join(DEFAULT_METHODS + (ENCODER_EXTRA_METHODS if args.encoder else ()))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"argument --methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    args.methods = methods
    for option, value in (("--seeds", args.seeds), ("--image-size", args.image_size),
                          ("--subsample", args.subsample)):  # fmt: skip
        if value is not None and value < 1:
            parser.error(f"argument {option}: must be >= 1, got {value}")
    # Output paths: the folder of every file must exist (or be --out) and be writable.
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: {args.out!r} exists and is not a folder")
    _check_writable_dir(parser, "--out", out if out.is_dir() else out.parent, args.out)
    args.out = out
    for option in ("plot", "json"):
        value = getattr(args, option)
        if option == "plot" and args.no_plot:
            args.plot = None
            continue
        path = _output_path(out, value)
        if path.is_dir():
            parser.error(f"argument --{option}: {value!r} is a folder; give a file name")
        if path.parent != out:
            _check_writable_dir(parser, f"--{option}", path.parent, value)
        setattr(args, option, path)
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        parser.error(f"argument --plot: {_PLOT_HINT}")
    # Inputs.
    if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
        parser.error(f"argument --data-dir: {args.data_dir!r} is not a folder")
    if args.dataset == "fashion-mnist":
        folder = Path(args.data_dir or os.environ.get("SKDKVB_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
        missing = [n for n in _FMNIST_FILES if not (folder / n).is_file() and not (folder / f"{n}.gz").is_file()]
        if missing and args.fallback:
            print(f"Fashion-MNIST not found in {folder}; falling back to --dataset digits.", file=sys.stderr)
            args.dataset = "digits"
        elif missing:
            parser.error(
                f"Fashion-MNIST files not found in {folder} ({missing[0]}[.gz]): install them with "
                "`sudo apt-get install dataset-fashion-mnist`, point --data-dir at a folder holding the four "
                "IDX files, or run --dataset digits (or --fallback)"
            )
    if args.encoder is None:
        for option in ("checkpoint", "image_size", "cache_dir"):
            if getattr(args, option) is not None:
                parser.error(f"argument --{option.replace('_', '-')}: only used with --encoder NAME")
    if args.encoder is not None:
        from .continual import datasets

        if not hasattr(datasets, "embed_dataset"):
            parser.error("argument --encoder: this version of skdkvb has no "
                         "skdkvb.continual.datasets.embed_dataset to embed the images with")  # fmt: skip
    if args.checkpoint is not None and not Path(args.checkpoint).expanduser().is_file():
        parser.error(f"argument --checkpoint: file {args.checkpoint!r} not found")
    if args.cache_dir is not None:
        cache = Path(args.cache_dir).expanduser()
        _check_writable_dir(parser, "--cache-dir", cache if cache.is_dir() else cache.parent, args.cache_dir)


def _device_error(device: str) -> str | None:
    """Why ``--device`` is unusable (imports torch), or None when it is fine."""
    import torch

    from ._device import resolve_device

    if device.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        return f"argument --device: {device!r} requested but CUDA is not available ({why}); use --device cpu or auto"
    try:
        resolve_device(device)
    except (ValueError, RuntimeError) as exc:
        return f"argument --device: {' '.join(str(exc).split())}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m skdkvb.benchmark``.

    Parameters
    ----------
    argv : sequence of str, default=None
        The arguments (``sys.argv[1:]`` if None).

    Returns
    -------
    code : int
        The exit code: 0 on success. Bad arguments exit with code 2 and one
        line of error before any work is done.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    mode = "off" if args.quiet else ("bar" if sys.stderr.isatty() else "lines")
    say = print
    seeds_text = f"{args.seeds} seed{'s' if args.seeds > 1 else ''}"
    source = f", embedded by {args.encoder}" if args.encoder else ""
    say(f"Class-incremental {args.dataset}{source}, {seeds_text}{' (quick)' if args.quick else ''}; "
        f"methods: {', '.join(args.methods)}", flush=True)  # fmt: skip
    progress = _Progress(mode)
    try:
        progress.open("importing torch", unit="step", announce=False)
        error = _device_error(args.device)
        if error is not None:
            progress.stop()
            parser.error(error)
        verbose = 1 if mode == "bar" else args.verbose
        reports = run(args.dataset, methods=args.methods, seeds=args.seeds, quick=args.quick,
                      device=args.device, data_dir=args.data_dir, encoder=args.encoder,
                      checkpoint=args.checkpoint, image_size=args.image_size, subsample=args.subsample,
                      cache_dir=args.cache_dir, verbose=verbose, progress=progress)  # fmt: skip
    finally:
        progress.stop()
    rows = _summary_rows(reports)
    say("")
    say(_caption(args.dataset, args.seeds, args.encoder))
    table = format_table(rows)
    say(table)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.json is not None:
        from .continual.evaluation import _jsonable

        payload = {"dataset": args.dataset, "seeds": args.seeds, "quick": args.quick, "encoder": args.encoder,
                   "image_size": args.image_size, "subsample": args.subsample,
                   "command": "python -m skdkvb.benchmark " + " ".join(sys.argv[1:] if argv is None else argv),
                   "dkvb_config": dkvb_config("embedded" if args.encoder else args.dataset, quick=args.quick),
                   "caption": _caption(args.dataset, args.seeds, args.encoder), "table": table,
                   "summary": rows, "reports": [r.to_dict() for r in reports]}  # fmt: skip
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(_jsonable(payload), fh, indent=1)
        say(f"wrote {args.json}")
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        from .continual.plotting import plot_benchmark

        fig = plot_benchmark(reports, title=f"Class-incremental {args.dataset}{source} ({seeds_text})")
        fig.savefig(args.plot, dpi=120)
        say(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
