"""DKVBClassifier: the Discrete Key-Value Bottleneck as a scikit-learn classifier."""

from __future__ import annotations

import math
import warnings
from numbers import Integral, Real

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from ._bottleneck import DECODERS, DiscreteKeyValueBottleneck
from ._device import resolve_device
from ._interrupts import defer_sigint as _defer_sigint
from ._keys import init_keys_kmeans, init_keys_random
from ._state import FITTED_ATTRS, HISTORY_MAX_ROWS, check_state, structure_of
from ._transform import InputTransform
from .utils._sklearn_compat import (
    Interval,
    StrOptions,
    check_sample_weight,
    fit_context,
    validate_estimator_params,
)

# Fitted attributes that a failed call must leave exactly as they were (the schema's).
_STATE_ATTRS = tuple(FITTED_ATTRS)

_INT_PARAMS = (
    "n_heads", "n_keys", "key_dim", "top_k", "key_init_epochs", "key_init_batch_size",
    "input_transform_components", "batch_size", "max_epochs", "partial_fit_epochs", "encoder_batch_size",
)  # fmt: skip
_REAL_PARAMS = (
    "count_smoothing", "temperature", "key_init_decay", "key_init_eps", "learning_rate",
    "label_smoothing", "grad_clip", "dropout",
)  # fmt: skip


#: Named parameter sets for :meth:`DKVBClassifier.from_preset`.
PRESETS = {
    "paper": dict(
        n_heads=256, n_keys=4096, key_dim=14, projection="random", top_k=1,
        input_transform=None, decoder="sgd", temperature=1.0, key_init="kmeans", key_init_epochs=10,
        key_init_decay=0.95, key_init_eps=1e-5, learning_rate=0.3, label_smoothing=0.1,
        batch_size=256, grad_clip=1.0, max_epochs=2000, partial_fit_epochs=2000,
        prune_unused_keys=True,
    ),
    "fast": dict(),
}  # fmt: skip


class DKVBClassifier(ClassifierMixin, BaseEstimator):
    """Discrete Key-Value Bottleneck classifier for class-incremental learning.

    Inputs (or their frozen-encoder embeddings) are projected into ``n_heads``
    low-dimensional queries; each query selects its nearest of ``n_keys`` frozen
    keys, and the values stored at the selected keys are decoded into class
    scores. Only values are learned and each sample only touches the values it
    selected, so learning new classes leaves what was learned for old ones
    nearly untouched (Träuble et al., ICML 2023).

    Parameters
    ----------
    n_heads : int or "auto", default="auto"
        Number of heads (codebooks) C. ``"auto"``: 1024 when an ``encoder``
        is set, 256 otherwise (see :func:`skdkvb.encoders.resolve_auto_params`).
    n_keys : int or "auto", default="auto"
        Keys per head M: the main capacity knob. ``"auto"``: 1024 when an
        ``encoder`` is set, 4096 otherwise; both hold the same number of key
        rows (``n_heads * n_keys``), so memory and search cost are the same.
    key_dim : int, default=14
        Key dimension d. Ignored with ``projection="chunk"`` (then ``D // C``).
    projection : {"random", "chunk"}, default="random"
        ``"random"``: a fixed Gaussian projection per head with L2-normalised
        columns. ``"chunk"``: split the input into ``n_heads`` equal slices.
    top_k : int or "auto", default="auto"
        Keys selected per head; their values are averaged (``sgd``, ``vote``)
        or their log-frequencies summed (``logp``). ``"auto"``: 4 when an
        ``encoder`` is set (at most ``n_keys``), 1 otherwise (see
        :func:`skdkvb.encoders.resolve_auto_params`).
    decoder : {"logp", "vote", "sgd"}, default="logp"
        ``"logp"``/``"vote"``: decoders computed from per-key class counts in a
        single pass (no learning rate, no epochs, order-independent); see
        Notes. ``"sgd"``: the paper's trained values with a mean decoder
        (``DKVBClassifier.from_preset("paper")`` sets up the paper's recipe).
        ``logp`` is the default because it matched or beat ``sgd`` in accuracy
        with calibrated probabilities at a fraction of the cost
        (see the Results page of the documentation).
    count_smoothing : float, default=0.1
        Additive smoothing ``a`` of the count decoders.
    temperature : float or "auto", default="auto"
        Scores are divided by it before the softmax of :meth:`predict_proba`
        (predictions never change). ``"auto"``: ``n_heads / 4`` for
        ``logp``, whose score sums strongly correlated per-head
        log-likelihoods and is over-confident by roughly that factor (the
        ``top_k`` keys of one head are neighbours and count as one head's
        evidence); ``1`` otherwise.
    key_init : {"kmeans", "random"}, default="kmeans"
        EMA k-means (paper) or queries of random samples.
    key_init_epochs : int, default=10
        Passes of EMA k-means.
    key_init_batch_size : int, default=1024
        Batch size of EMA k-means.
    key_init_decay : float, default=0.95
        EMA decay of k-means.
    key_init_eps : float, default=1e-5
        Laplace smoothing of the k-means counts.
    input_transform : {"auto", None, "pca-whiten"}, default="auto"
        Optional unsupervised transform fitted together with the keys on the
        same unlabeled data: PCA-whitening then L2 normalisation.
        ``"auto"``: ``"pca-whiten"`` when an ``encoder`` is set, None
        otherwise. With an encoder, ``"auto"`` for this parameter,
        ``n_heads``, ``n_keys``, ``input_transform_components`` and
        ``top_k`` is the setting measured
        on real backbone embeddings (the "Real backbones" section of the
        Results page); without one it is the setting for raw inputs, as
        before ``"auto"`` existed. Pass precomputed embeddings with
        ``**skdkvb.encoders.dkvb_params_for_embeddings()`` to get the former.
    input_transform_components : int or "auto", default="auto"
        Components kept by ``"pca-whiten"``. ``"auto"``: 256 when an
        ``encoder`` is set, 64 otherwise.
    learning_rate : float, default=0.3
        SGD learning rate of the values (plain SGD, no momentum).
    label_smoothing : float, default=0.1
        Label smoothing of the cross-entropy.
    batch_size : int, default=256
        Mini-batch size of the value updates.
    max_epochs : int, default=10
        Epochs of :meth:`fit` (the paper uses up to 2000 per task; epochs are
        cheap because key indices are computed once per call).
    partial_fit_epochs : int, default=1
        Epochs over the batch in each :meth:`partial_fit` call.
    grad_clip : float or None, default=1.0
        Maximum gradient norm per step.
    dropout : float, default=0.0
        Probability of dropping a selected value during training.
    values_dtype : {"float32", "float16", "bfloat16"}, default="float32"
        Storage of the value table of the ``sgd`` decoder (``C * M`` rows
        times the allocated classes; the count decoders have no value table).
        Half precision halves it (4 -> 2 GiB for 1000 classes at the
        paper's size) at a cost of ~0.3 points measured on Fashion-MNIST
        (see the Performance page of the documentation); softmax and gradients stay in float32.
    prune_unused_keys : bool, default=True
        At prediction time, treat keys never selected during training as
        infinitely far, so that unseen regions fall back to a trained key.
    new_classes : {"grow", "error"}, default="grow"
        What :meth:`partial_fit` does with labels not in ``classes_``.
    shuffle : bool, default=True
        Shuffle samples between epochs.
    encoder : None, str or torch.nn.Module, default=None
        Frozen feature extractor: ``None`` (inputs are embeddings), a timm model
        name, or a module/callable. See :mod:`skdkvb.encoders`.
    encoder_kwargs : dict, default=None
        Arguments of the encoder (e.g. ``checkpoint_path``).
    encoder_batch_size : int, default=64
        Batch size of the encoder forward passes.
    device : {"auto", "cpu", "cuda"} or str, default="auto"
        Where tensors live; ``"auto"`` uses CUDA when available.
    random_state : int, RandomState instance or None, default=None
        Seeds the projection, key initialisation, shuffling and dropout.
    verbose : int, default=0
        Show progress bars when > 0.
    warm_start : bool, default=False
        When True, :meth:`fit` keeps the keys (and learned values) of a previous
        :meth:`fit_keys`/:meth:`fit` instead of re-initialising them.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Labels in order of arrival (sorted for :meth:`fit` and for ``classes=``).
    n_features_in_ : int
        Number of input features (when ``encoder`` is None).
    feature_names_in_ : ndarray of str
        Input feature names, when X had them.
    bottleneck_ : DiscreteKeyValueBottleneck
        The torch module: projection, keys and the tables of the decoder
        (class counts for ``logp``/``vote``; values and per-key usage for
        ``sgd``; see the Memory page of the user guide).
    input_transform_ : InputTransform or None
    encoder_ : object or None
        The built frozen encoder.
    device_ : torch.device
    n_iter_ : int
        Epochs run by the last :meth:`fit`, or in total by :meth:`partial_fit`.
    t_ : float
        Number of (weighted) training samples seen.
    history_ : list of dict
        One row per epoch: ``call``, ``epoch``, ``n_samples``, ``loss``.
    key_init_info_ : dict
        Key-initialisation report (method, re-seeded keys per epoch, usage).

    See Also
    --------
    skdkvb.continual.evaluate_stream : Evaluate on a class-incremental stream.

    Notes
    -----
    Keys are frozen, so each call computes each sample's key indices once and
    reuses them for all of its epochs. :meth:`partial_fit` initialises keys on
    its first batch when nothing initialised them before; when that batch holds
    only one class, all keys are placed where that class lives. Prefer calling
    :meth:`fit_keys` on unlabeled data of the domain first.

    The count decoders use the table ``n[c, m, y]`` of weighted class counts
    per key: ``vote`` scores are the mean over heads of the smoothed class
    frequencies of the selected keys; ``logp`` scores are their summed logs
    (a naive-Bayes rule). Column ``y`` only ever sees class-``y`` data, so they
    are exactly class-incremental. The counts are stored exactly, dense while
    ``n_heads * n_keys * n_classes`` is small and as a sparse store of the
    nonzero cells beyond (chosen automatically), and prediction gathers the
    counts of the selected keys only, so memory follows what the stream put
    where rather than the product of the sizes.

    References
    ----------
    F. Träuble et al., "Discrete Key-Value Bottleneck", ICML 2023.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from skdkvb import DKVBClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = DKVBClassifier(n_heads=16, n_keys=32, key_dim=2, key_init_epochs=2,
    ...                      random_state=0, device="cpu").fit(X, y)
    >>> round(clf.score(X, y), 2) >= 0.9
    True
    """

    _parameter_constraints: dict = {
        "n_heads": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "n_keys": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "key_dim": [Interval(Integral, 1, None, closed="left")],
        "projection": [StrOptions({"random", "chunk"})],
        "top_k": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "decoder": [StrOptions(set(DECODERS))],
        "count_smoothing": [Interval(Real, 0, None, closed="neither")],
        "temperature": [Interval(Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "key_init": [StrOptions({"kmeans", "random"})],
        "key_init_epochs": [Interval(Integral, 0, None, closed="left")],
        "key_init_batch_size": [Interval(Integral, 1, None, closed="left")],
        "key_init_decay": [Interval(Real, 0, 1, closed="left")],
        "key_init_eps": [Interval(Real, 0, None, closed="left")],
        "input_transform": [None, StrOptions({"pca-whiten", "auto"})],
        "input_transform_components": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "partial_fit_epochs": [Interval(Integral, 1, None, closed="left")],
        "grad_clip": [None, Interval(Real, 0, None, closed="neither")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "values_dtype": [StrOptions({"float32", "float16", "bfloat16"})],
        "prune_unused_keys": ["boolean"],
        "new_classes": [StrOptions({"grow", "error"})],
        "shuffle": ["boolean"],
        "encoder": [None, str, object],
        "encoder_kwargs": [None, dict],
        "encoder_batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
    }

    def __init__(
        self,
        n_heads="auto",
        n_keys="auto",
        key_dim=14,
        *,
        projection="random",
        top_k="auto",
        decoder="logp",
        count_smoothing=0.1,
        temperature="auto",
        key_init="kmeans",
        key_init_epochs=10,
        key_init_batch_size=1024,
        key_init_decay=0.95,
        key_init_eps=1e-5,
        input_transform="auto",
        input_transform_components="auto",
        learning_rate=0.3,
        label_smoothing=0.1,
        batch_size=256,
        max_epochs=10,
        partial_fit_epochs=1,
        grad_clip=1.0,
        dropout=0.0,
        values_dtype="float32",
        prune_unused_keys=True,
        new_classes="grow",
        shuffle=True,
        encoder=None,
        encoder_kwargs=None,
        encoder_batch_size=64,
        device="auto",
        random_state=None,
        verbose=0,
        warm_start=False,
    ):
        self.n_heads = n_heads
        self.n_keys = n_keys
        self.key_dim = key_dim
        self.projection = projection
        self.top_k = top_k
        self.decoder = decoder
        self.count_smoothing = count_smoothing
        self.temperature = temperature
        self.key_init = key_init
        self.key_init_epochs = key_init_epochs
        self.key_init_batch_size = key_init_batch_size
        self.key_init_decay = key_init_decay
        self.key_init_eps = key_init_eps
        self.input_transform = input_transform
        self.input_transform_components = input_transform_components
        self.learning_rate = learning_rate
        self.label_smoothing = label_smoothing
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.partial_fit_epochs = partial_fit_epochs
        self.grad_clip = grad_clip
        self.dropout = dropout
        self.values_dtype = values_dtype
        self.prune_unused_keys = prune_unused_keys
        self.new_classes = new_classes
        self.shuffle = shuffle
        self.encoder = encoder
        self.encoder_kwargs = encoder_kwargs
        self.encoder_batch_size = encoder_batch_size
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start

    @classmethod
    def from_preset(cls, name, **overrides):
        """An estimator configured by a named preset (see :data:`PRESETS`).

        Parameters
        ----------
        name : {"paper", "fast"}
            ``"paper"``: the DKVB paper's recipe (SGD-trained values, EMA k-means
            keys over 10 epochs, 2000 epochs per :meth:`partial_fit` call as per
            task in the paper's CIFAR10 runs). ``"fast"``: the defaults.
        **overrides
            Parameters that replace the preset's.

        Examples
        --------
        >>> from skdkvb import DKVBClassifier
        >>> clf = DKVBClassifier.from_preset("paper", partial_fit_epochs=10)
        >>> clf.decoder, clf.n_heads, clf.learning_rate, clf.partial_fit_epochs
        ('sgd', 256, 0.3, 10)
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    # ------------------------------------------------------------------ tags
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = self.encoder is None
        tags.input_tags.two_d_array = True
        # Image encoders take (N, H, W, C) / (N, C, H, W) batches.
        tags.input_tags.three_d_array = self.encoder is not None
        tags.classifier_tags.multi_class = True
        tags.classifier_tags.poor_score = False
        tags.non_deterministic = False
        return tags

    def __sklearn_is_fitted__(self):
        return hasattr(self, "classes_")

    # ------------------------------------------------------------- public API
    @fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Initialise keys on ``X`` and train the values on ``(X, y)``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Inputs, or raw inputs of the ``encoder``.
        y : array-like of shape (n_samples,)
            Class labels.
            Labels of any type scikit-learn accepts.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights, finite in float32 (``None``: unit weights).

        Returns
        -------
        self : DKVBClassifier
            The fitted estimator.
        """
        keep = self.warm_start and hasattr(self, "bottleneck_")
        self._check_extra_params(training=True, fitted=keep)
        with _Transaction(self):
            Z, y, sample_weight = self._validate_xy(X, y, sample_weight, reset=not keep)
            if len(sample_weight) and not sample_weight.any():
                raise ValueError(
                    "Sample weights must contain at least one non-zero number: fit cannot learn from a data "
                    "set whose weights are all zero (partial_fit treats such a batch as a no-op)."
                )
            if not keep:
                self._reset()
                self._init_keys(Z)
                new = np.unique(y)
                self.bottleneck_.add_classes(len(new))
                classes = new
            else:
                new = self._check_labels(y, None)
                classes = self._grow_classes(new, sort=True)
            t_add, rows = self._train(Z, y, sample_weight, self.max_epochs, call="fit", classes=classes)
            self._commit(classes, t_add, rows, n_iter=self.max_epochs)
        return self

    @fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """Train on one batch of a stream; ``classes_`` grows with new labels.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
            Class labels.
        classes : array-like of shape (n_classes,), default=None
            Labels to declare up front (optional: with ``new_classes="grow"``
            unseen labels are added in order of arrival).
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights, finite in float32 (``None``: unit weights).

        Returns
        -------
        self : DKVBClassifier
            The fitted estimator.
        """
        first = not hasattr(self, "bottleneck_")
        self._check_extra_params(training=True, fitted=not first)
        with _Transaction(self):
            Z, y, sample_weight = self._validate_xy(X, y, sample_weight, reset=first)
            classes = self._validate_declared_classes(classes)
            new = self._check_labels(y, classes)
            if first:
                self._reset()
                self._init_keys(Z)
            all_classes = self._grow_classes(new, sort=False, declared=classes)
            t_add, rows = self._train(
                Z, y, sample_weight, self.partial_fit_epochs, call="partial_fit", classes=all_classes
            )
            self._commit(all_classes, t_add, rows, n_iter=getattr(self, "n_iter_", 0) + self.partial_fit_epochs)
        return self

    @fit_context(prefer_skip_nested_validation=True)
    def fit_keys(self, X, y=None):
        """Initialise the keys (and input transform) on unlabeled data.

        Learned values and classes are discarded; later :meth:`partial_fit`
        calls, or :meth:`fit` with ``warm_start=True``, keep these keys.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
        y : None
            Ignored; present for API consistency.

        Returns
        -------
        self : DKVBClassifier
            The fitted estimator.
        """
        self._check_extra_params(training=True, fitted=False)
        with _Transaction(self):
            Z = self._validate_x(X, reset=True)
            self._reset()
            self._init_keys(Z)
            with _defer_sigint():
                for attr in ("classes_", "n_iter_"):
                    self.__dict__.pop(attr, None)
        return self

    def decision_function(self, X):
        """Class scores, shape (n_samples, n_classes), or (n_samples,) for two classes.

        ``sgd``: mean of the selected values; ``vote``: mean smoothed class
        frequency; ``logp``: summed log smoothed class frequency. With two
        classes, the score of ``classes_[1]`` minus that of ``classes_[0]``
        (scikit-learn's binary convention).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Inputs, or raw inputs of the ``encoder``.

        Returns
        -------
        ndarray of shape (n_samples, n_classes) or (n_samples,)
            The scores, in float64.
        """
        self._check_predict_ready()
        Z = self._validate_x(X, reset=False)
        scores = self._scores(Z).double()
        if scores.shape[1] == 2:
            scores = scores[:, 1] - scores[:, 0]
        return scores.cpu().numpy()

    def predict_proba(self, X):
        """Class probabilities, shape (n_samples, n_classes); rows sum to 1.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Inputs, or raw inputs of the ``encoder``.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Probabilities of the classes in the order of ``classes_``.
        """
        self._check_predict_ready()
        Z = self._validate_x(X, reset=False)
        return self._proba(self._scores(Z)).cpu().numpy()

    def predict_log_proba(self, X):
        """Logarithm of :meth:`predict_proba`.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Inputs, or raw inputs of the ``encoder``.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Log-probabilities of the classes in the order of ``classes_``.
        """
        self._check_predict_ready()
        Z = self._validate_x(X, reset=False)
        return self._log_proba(self._scores(Z)).cpu().numpy()

    def predict(self, X):
        """Most probable class of each sample.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Inputs, or raw inputs of the ``encoder``.

        Returns
        -------
        ndarray of shape (n_samples,)
            Predicted labels (elements of ``classes_``).
        """
        self._check_predict_ready()
        Z = self._validate_x(X, reset=False)
        return self.classes_[self._scores(Z).argmax(dim=1).cpu().numpy()]

    def key_indices(self, X, *, prune=None):
        """Selected key of each head, shape (n_samples, n_heads, top_k).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Inputs, or raw inputs of the ``encoder``.
        prune : bool, default=None
            Skip never-trained keys; defaults to ``prune_unused_keys``.

        Returns
        -------
        ndarray of shape (n_samples, n_heads, top_k)
            Key index (in ``[0, n_keys)``) selected by each head.
        """
        check_is_fitted(self, "bottleneck_")
        self._check_extra_params(training=False, fitted=True)
        Z = self._validate_x(X, reset=False)
        prune = self.prune_unused_keys if prune is None else prune
        return self._indices(Z, prune=prune).cpu().numpy()

    # --------------------------------------------------------------- internals
    def _reset(self):
        """Fresh RNG, device, encoder and (empty) bottleneck; drops learned state."""
        for attr in ("classes_", "n_iter_", "t_", "history_", "bottleneck_", "input_transform_"):
            self.__dict__.pop(attr, None)
        self._rng = check_random_state(self.random_state)
        if isinstance(self.random_state, np.random.RandomState):
            # Never advance a user-provided RandomState across clones/refits.
            self._rng = np.random.RandomState(self.random_state.randint(2**31 - 1))
        self.history_ = []
        self.t_ = 0.0

    def _torch_seed(self) -> int:
        return int(self._rng.randint(2**31 - 1))

    def _target_device(self, reset):
        """The device to use: resolved afresh when (re)fitting, else the fitted one."""
        if reset or not hasattr(self, "device_"):
            return resolve_device(self.device)
        return self.device_

    def _validate_x(self, X, reset):
        """Validated inputs as a dense float32 tensor on the device, or CSR float32."""
        if self.encoder is not None:
            device = self._target_device(reset)
            from .encoders import build_encoder

            if reset or getattr(self, "encoder_", None) is None:
                encoder = build_encoder(
                    self.encoder,
                    self.encoder_kwargs,
                    device=device,
                    batch_size=self.encoder_batch_size,
                    verbose=self.verbose,
                )
            else:
                encoder = self.encoder_
            encoder.validate(X)
            shape = tuple(X.shape) if isinstance(X, torch.Tensor) else np.asarray(X).shape
            if len(shape) == 2:
                # Tabular input through an encoder still has a feature count to check.
                n_in = shape[1]
                if reset:
                    self.n_features_in_ = n_in
                elif getattr(self, "n_features_in_", n_in) != n_in:
                    raise ValueError(
                        f"X has {n_in} features, but {type(self).__name__} is expecting "
                        f"{self.n_features_in_} features as input."
                    )
            elif reset:
                self.__dict__.pop("n_features_in_", None)
            Z = encoder.embed(X).to(device=device, dtype=torch.float32)
            if not bool(torch.isfinite(Z).all()):
                i = int(torch.nonzero(~torch.isfinite(Z).all(1))[0, 0])
                raise ValueError(
                    f"The encoder returned values that are not finite in float32 (e.g. for sample {i}); "
                    "check the inputs and the encoder."
                )
            if reset:
                self.encoder_ = encoder
                self.device_ = device
            else:
                # The bottleneck sees the input transform's output; the encoder's width is the transform's input.
                transform = self.__dict__.get("input_transform_")
                expected = transform.mean_.shape[0] if transform is not None else self.bottleneck_.n_features
                if Z.shape[1] != expected:
                    raise ValueError(
                        f"The encoder produced {Z.shape[1]} features but the model was fitted on {expected}."
                    )
            return Z
        return self._validate_tabular(X, "no_validation", reset)

    def _validate_tabular(self, X, y, reset):
        """``validate_data`` for inputs without an encoder (``y="no_validation"``: X only)."""
        device = self._target_device(reset)
        out = validate_data(self, X, y, accept_sparse="csr", dtype=[np.float32, np.float64], reset=reset)
        if reset:
            self.encoder_ = None
            self.device_ = device
        if isinstance(y, str) and y == "no_validation":
            return self._as_model_input(out)
        return self._as_model_input(out[0]), out[1]

    def _validate_xy(self, X, y, sample_weight, reset):
        if self.encoder is not None:
            if y is None:
                raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None.")
            y = column_or_1d(y, warn=True)
            Z = self._validate_x(X, reset=reset)
            if y.shape[0] != Z.shape[0]:
                raise ValueError(
                    f"Found input variables with inconsistent numbers of samples: [{Z.shape[0]}, {y.shape[0]}]."
                )
        else:
            Z, y = self._validate_tabular(X, y, reset)
        check_classification_targets(y)
        if sample_weight is not None and not hasattr(sample_weight, "detach") and not np.isscalar(sample_weight):
            sample_weight = np.asarray(sample_weight)  # array-likes such as sklearn's _NotAnArray
        sample_weight = check_sample_weight(sample_weight, Z.shape[0], dtype=np.float64)
        return Z, y, sample_weight

    def _as_model_input(self, X):
        if sp.issparse(X):
            X = X.astype(np.float32).tocsr()
            bad = ~np.isfinite(X.data)
            if bad.any():
                col = int(X.indices[np.flatnonzero(bad)[0]])
                raise ValueError(f"X holds values that are not finite in float32 (e.g. in column {col}).")
            return X
        with np.errstate(over="ignore", invalid="ignore"):
            X32 = np.ascontiguousarray(X, dtype=np.float32)
        _check_finite32(X32, "X")
        return torch.as_tensor(X32, device=self.device_)

    def _validate_declared_classes(self, classes):
        """``classes=`` as a validated 1-D array (or None)."""
        if classes is None:
            return None
        classes = np.asarray(classes)
        if classes.ndim != 1:
            raise ValueError(f"classes must be a 1-D array of labels, got an array of shape {classes.shape}.")
        check_classification_targets(classes)
        if len(np.unique(classes)) != len(classes):
            raise ValueError(f"classes must not hold duplicates, got {classes.tolist()}.")
        return classes

    def _check_labels(self, y, classes):
        """Labels of ``y`` (and ``classes``) not yet in ``classes_``; raise on type clashes or forbidden growth."""
        seen = getattr(self, "classes_", None)
        kinds = {"y": _label_kind(y)}
        if classes is not None:
            kinds["classes"] = _label_kind(classes)
        if seen is not None:
            kinds["classes_"] = _label_kind(seen)
        if len(set(kinds.values())) > 1:
            raise TypeError(
                "Label types must agree: "
                + ", ".join(f"{k} holds {v} labels" for k, v in kinds.items())
                + ". Convert the labels (or classes=) to one type."
            )
        if classes is not None:
            undeclared = np.setdiff1d(np.unique(y), classes)
            if len(undeclared) and self.new_classes == "error":
                raise ValueError(
                    f"y contains labels {undeclared.tolist()} that are not in classes={classes.tolist()} "
                    "while new_classes='error'. Declare every label in classes=, or set new_classes='grow'."
                )
        incoming = y if classes is None else np.concatenate([classes, y])
        _, first_pos = np.unique(incoming, return_index=True)
        ordered = incoming[np.sort(first_pos)]
        if seen is None:
            return ordered
        new = ordered[~np.isin(ordered, seen)]
        if len(new) and self.new_classes == "error":
            raise ValueError(
                f"y contains labels not seen before: {new.tolist()}; known classes_ are "
                f"{seen.tolist()}. Set new_classes='grow' to add them, or declare all "
                "classes on the first partial_fit call with classes=."
            )
        return new

    def _grow_classes(self, new, sort, declared=None):
        """Give the bottleneck the columns of the ``new`` labels and return the full class list.

        ``classes_`` itself is only replaced at commit time: until then the
        grown columns are invisible (and dropped by a rollback).
        """
        if not hasattr(self, "classes_"):
            if (self.decoder == "sgd") == self.bottleneck_.counts_based:
                # The decoder changed after fit_keys, before any label: the tables follow it
                # (a new module; the transaction puts the old one back on failure).
                self.bottleneck_ = self.bottleneck_.with_decoder(self.decoder)
            if declared is not None:
                extra = new[~np.isin(new, declared)]  # keeps arrival order
                base = np.unique(declared)
                new = np.concatenate([base, extra]) if len(extra) else base
            classes = np.asarray(new)
            self.bottleneck_.add_classes(len(classes) - self.bottleneck_.n_classes)
            return classes
        if not len(new):
            return self.classes_
        if sort:
            new = np.sort(new)
        self.bottleneck_.add_classes(len(new))
        return np.concatenate([self.classes_, new])

    def _commit(self, classes, t_add, rows, n_iter):
        """Publish a training call's results: few assignments, SIGINT deferred."""
        history = (list(self.history_) + rows)[-HISTORY_MAX_ROWS:]
        structure = structure_of(self)
        t_new = self.t_ + t_add
        with _defer_sigint():
            self.classes_ = classes
            self.t_ = t_new
            self.history_ = history
            self.n_iter_ = n_iter
            self.structure_ = structure

    @staticmethod
    def _encode_with(classes, y):
        sorter = np.argsort(classes, kind="stable")
        pos = np.searchsorted(classes, y, sorter=sorter)
        return sorter[pos]

    def _encode_labels(self, y):
        return self._encode_with(self.classes_, y)

    # ------------------------------------------------------ parameter checks
    def _check_extra_params(self, *, training, fitted):
        """What ``_parameter_constraints`` cannot say: no bools as ints, finite reals, an unchanged structure."""
        for name in _INT_PARAMS:
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)):
                raise ValueError(f"The {name!r} parameter of {type(self).__name__} must be an int, got {value!r}.")
        for name in _REAL_PARAMS:
            value = getattr(self, name)
            if isinstance(value, Real) and not isinstance(value, bool) and not math.isfinite(value):
                raise ValueError(f"The {name!r} parameter of {type(self).__name__} must be finite, got {value!r}.")
        if fitted:
            self._check_structure()

    def _check_structure(self):
        """A fitted model's structural parameters must not have changed since fit."""
        fitted = self.__dict__.get("structure_")
        if fitted is None:
            return
        now = structure_of(self)
        for name, old in fitted.items():
            new = now.get(name)
            if name == "decoder" and ("classes_" not in self.__dict__ or {old, new} <= {"logp", "vote"}):
                continue  # before any labels, or between the count decoders (one shared state)
            if new != old:
                raise ValueError(
                    f"{name}={new!r} was set after this model was fitted with {name}={old!r}; the fitted "
                    f"state depends on it. Set {name}={old!r} back, or refit (fit, or fit_keys then partial_fit)."
                )

    def _check_predict_ready(self):
        check_is_fitted(self)
        validate_estimator_params(self)
        self._check_extra_params(training=False, fitted=True)

    def _check_state(self):
        """Verify the fitted state's invariants (see :mod:`skdkvb._state`); raise ``StateError`` if broken."""
        check_state(self)

    # ----------------------------------------------------------- key set-up
    def _rows(self, Z, rows):
        """Rows of Z on the device: a dense tensor, or a sparse CSR tensor for sparse Z.

        Sparse inputs stay sparse: the projection (and the optional transform)
        are linear maps applied as sparse-dense products, so only the
        (rows, C * d) queries are ever dense.
        """
        if isinstance(Z, torch.Tensor):
            return Z[torch.as_tensor(rows, device=Z.device)] if not isinstance(rows, slice) else Z[rows]
        part = Z[rows]
        with warnings.catch_warnings():
            # scipy already guarantees a valid CSR; torch's "beta" notice is noise here.
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                torch.as_tensor(part.indptr, dtype=torch.int64),
                torch.as_tensor(part.indices, dtype=torch.int64),
                torch.as_tensor(part.data, dtype=torch.float32),
                size=part.shape,
                check_invariants=False,
            ).to(self.device_)

    def _queries(self, Z_rows):
        if self.input_transform_ is not None:
            Z_rows = self.input_transform_.transform(Z_rows)
        elif Z_rows.layout == torch.sparse_csr and self.bottleneck_.projection is None:
            Z_rows = Z_rows.to_dense()  # chunk mode: the queries are the input itself
        return self.bottleneck_.project(Z_rows)

    def _auto_params(self, n_samples=None):
        """``n_heads``, ``n_keys``, ``input_transform``, ``input_transform_components`` and ``top_k``, resolved."""
        from .encoders._presets import resolve_auto_params

        return resolve_auto_params(
            self.encoder,
            n_heads=self.n_heads,
            n_keys=self.n_keys,
            input_transform=self.input_transform,
            input_transform_components=self.input_transform_components,
            top_k=self.top_k,
            n_samples=n_samples,
        )

    def _init_keys(self, Z):
        n = Z.shape[0]
        n_fit = min(n, 20000)  # rows the input transform is fitted on
        auto = self._auto_params(n_samples=n_fit)
        n_heads, n_keys = auto["n_heads"], auto["n_keys"]
        if auto["top_k"] > n_keys:  # before any fitting: nothing to undo
            raise ValueError(f"top_k={auto['top_k']} must not exceed n_keys={n_keys}.")
        if auto["input_transform"] is not None:
            sample = self._rng.choice(n, size=n_fit, replace=False)
            rows = self._rows(Z, np.sort(sample))
            self.input_transform_ = InputTransform(auto["input_transform"], auto["input_transform_components"]).fit(
                rows.to_dense() if rows.layout == torch.sparse_csr else rows
            )
            n_features = self.input_transform_.n_features_out_
        else:
            self.input_transform_ = None
            n_features = Z.shape[1]
        key_dim = self.key_dim
        if self.projection == "chunk":
            if n_features % n_heads:
                raise ValueError(
                    f"projection='chunk' needs the number of features ({n_features}) to be "
                    f"divisible by n_heads ({n_heads})."
                )
            key_dim = n_features // n_heads
        gen = torch.Generator().manual_seed(self._torch_seed())
        self.bottleneck_ = DiscreteKeyValueBottleneck(
            n_features,
            n_heads,
            n_keys,
            key_dim,
            projection=self.projection,
            top_k=auto["top_k"],
            values_dtype=self.values_dtype,
            decoder=self.decoder,
            generator=gen,
        ).to(self.device_)

        def query_fn(rows):
            return self._queries(self._rows(Z, np.asarray(rows)))

        if n < n_keys:
            warnings.warn(
                f"Key initialisation sees {n} samples for n_keys={n_keys} keys per head: at most {n} "
                "distinct keys per head can be placed, the others are jittered copies. Call fit_keys on more "
                "(unlabeled) data of the domain, or lower n_keys.",
                UserWarning,
                stacklevel=4,  # _init_keys <- fit/partial_fit/fit_keys <- fit_context wrapper <- caller
            )

        if self.key_init == "random" or self.key_init_epochs == 0:
            keys = init_keys_random(query_fn, n, n_keys, self._rng)
            info = {"method": "random"}
        else:
            keys, info = init_keys_kmeans(
                query_fn,
                n,
                n_keys,
                self._rng,
                epochs=self.key_init_epochs,
                batch_size=self.key_init_batch_size,
                decay=self.key_init_decay,
                eps=self.key_init_eps,
                verbose=self.verbose,
            )
            info = {"method": "kmeans", **info}
        self.bottleneck_.set_keys(keys)
        self.key_init_info_ = info
        self.structure_ = structure_of(self)

    # ---------------------------------------------------------------- lookup
    def _queries_of(self, Z):
        """``rows -> queries``: the estimator's side of the core's block search."""
        return lambda rows: self._queries(self._rows(Z, rows))

    def _indices(self, Z, prune):
        """Key indices (n, C, k) of all rows, as int32."""
        return self.bottleneck_.batch_indices(self._queries_of(Z), Z.shape[0], prune=prune, verbose=self.verbose)

    def _scores(self, Z):
        """Decoded scores (n, K), searched and decoded block by block by the core."""
        return self.bottleneck_.batch_scores(
            self._queries_of(Z),
            Z.shape[0],
            self.decoder,
            smoothing=self.count_smoothing,
            prune=self.prune_unused_keys,
            verbose=self.verbose,
        )

    def _temperature(self):
        if self.temperature != "auto":
            return float(self.temperature)
        if self.decoder == "logp":
            # Not n_heads * top_k: one head's top-k keys are neighbouring cells, nearly one piece of
            # evidence (expected calibration error 0.03-0.07 against 0.2-0.45 on real embeddings).
            return self.bottleneck_.n_heads / 4.0
        return 1.0

    def _proba(self, scores):
        if self.decoder == "vote" and self.temperature == "auto":
            # A mean of per-key distributions is already a distribution.
            return (scores / scores.sum(1, keepdim=True)).double()
        return torch.softmax(scores.double() / self._temperature(), dim=1)

    def _log_proba(self, scores):
        if self.decoder == "vote" and self.temperature == "auto":
            return self._proba(scores).log()
        return torch.log_softmax(scores.double() / self._temperature(), dim=1)

    # -------------------------------------------------------------- training
    def _train(self, Z, y, sample_weight, epochs, call, classes):
        """Index the validated batch once and let the core learn from it.

        Returns ``(t_add, history rows)``; the estimator's attributes are left
        to :meth:`_commit`, the bottleneck's tables are journaled for rollback.
        """
        idx = self._indices(Z, prune=False)
        y_enc = torch.as_tensor(self._encode_with(classes, y), device=self.device_, dtype=torch.int64)
        rows = self.bottleneck_.learn(
            idx,
            y_enc,
            sample_weight,
            decoder=self.decoder,
            epochs=epochs,
            rng=self._rng,
            lr=self.learning_rate,
            label_smoothing=self.label_smoothing,
            batch_size=self.batch_size,
            grad_clip=self.grad_clip,
            dropout=self.dropout,
            shuffle=self.shuffle,
            call=call,
            verbose=self.verbose,
        )
        return float(sample_weight.sum()), rows[-HISTORY_MAX_ROWS:]

    # ------------------------------------------------------------ pickling
    def __getstate__(self):
        # Copy: BaseEstimator may hand back the live __dict__.
        state = dict(super().__getstate__())
        module = state.get("bottleneck_")
        if module is not None:
            # Host-memory arrays: a model trained on a GPU unpickles anywhere.
            state["bottleneck_"] = {
                "config": module.config(),
                # numpy views of the live tables, not copies (pickle streams them; skops.io
                # stores arrays natively but not tensors). bfloat16 blocks are their int16 bits.
                "state": module.arrays(),
            }
        if "device_" in state:
            state["device_"] = str(state["device_"])
        transform = state.get("input_transform_")
        if transform is not None:
            state["input_transform_"] = transform.to("cpu", copy=True)
        return state

    def __setstate__(self, state):
        saved = state.get("bottleneck_")
        device = None
        if "device_" in state:
            device = torch.device(state["device_"])
            if device.type == "cuda" and not torch.cuda.is_available():
                warnings.warn(
                    "This model was saved on a CUDA device but CUDA is not available; loading it on the CPU.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                device = torch.device("cpu")
            state["device_"] = device
        if isinstance(saved, dict):
            config = dict(saved["config"])
            config.setdefault("decoder", state.get("decoder", "logp"))  # pickles of earlier versions
            # Unpickled arrays are fresh: the tables may use them in place (no second copy).
            state["bottleneck_"] = DiscreteKeyValueBottleneck.from_state(
                config, saved["state"], device or "cpu", copy=False
            )
        transform = state.get("input_transform_")
        if transform is not None and device is not None:
            state["input_transform_"] = transform.to(device)
        encoder = state.get("encoder_")
        if encoder is not None and device is not None and hasattr(encoder, "to"):
            encoder.to(device)
        super().__setstate__(state)
        check_state(self)


def _check_finite32(a, what):
    """Raise a ValueError naming the first column of ``a`` that is not finite in float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        ok = np.isfinite(a)
    if not ok.all():
        bad = ~ok.reshape(a.shape[0], -1)
        col = int(np.flatnonzero(bad.any(0))[0])
        row = int(np.flatnonzero(bad[:, col])[0])
        raise ValueError(
            f"{what} holds values that are not finite in float32 (the computation dtype): column {col}, "
            f"e.g. sample {row}. Scale the inputs so that |x| < 3.4e38."
        )


def _label_kind(labels) -> str:
    """Coarse type of a label array: "integer", "text", "boolean", "float" or "object"."""
    a = np.asarray(labels)
    kind = a.dtype.kind
    if kind == "O" and a.size:
        kinds = {_label_kind(np.asarray([v])) for v in a.ravel()[:1000]}
        return kinds.pop() if len(kinds) == 1 else "object"
    return {"i": "integer", "u": "integer", "U": "text", "S": "text", "b": "boolean", "f": "float"}.get(kind, "object")


class _Transaction:
    """All-or-nothing training calls: on any exception (KeyboardInterrupt and
    MemoryError included) the fitted state is put back exactly as it was.

    The estimator's attributes are restored by reference (a call replaces
    them, never mutates them, except the RNG whose state is saved), and the
    bottleneck undoes its journaled in-place updates; no table is copied.
    """

    def __init__(self, est):
        self.est = est

    def __enter__(self):
        d = self.est.__dict__
        self.saved = {k: d[k] for k in _STATE_ATTRS if k in d}
        self.rng_state = d["_rng"].get_state() if "_rng" in d else None
        self.module = d.get("bottleneck_")
        if self.module is not None:
            self.module.begin()
        return self

    def __exit__(self, exc_type, exc, tb):
        with _defer_sigint():
            if exc_type is None:
                if self.module is not None:
                    self.module.commit()
                return False
            d = self.est.__dict__
            for k in _STATE_ATTRS:
                d.pop(k, None)
            d.update(self.saved)
            if self.rng_state is not None:
                d["_rng"].set_state(self.rng_state)
            if self.module is not None:
                self.module.rollback()
        return False
