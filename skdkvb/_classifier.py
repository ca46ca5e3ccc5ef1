"""DKVBClassifier: the Discrete Key-Value Bottleneck as a scikit-learn classifier."""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, column_or_1d, validate_data
from tqdm.auto import tqdm

from ._bottleneck import DECODERS, DiscreteKeyValueBottleneck
from ._device import resolve_device
from ._keys import init_keys_kmeans, init_keys_random
from ._transform import InputTransform

#: Rows searched (and decoded) per block: bounds the memory of predict/fit in n.
_BLOCK_ROWS = 8192

# Fitted attributes that a failed call must leave exactly as they were.
_STATE_ATTRS = (
    "n_features_in_",
    "feature_names_in_",
    "classes_",
    "bottleneck_",
    "input_transform_",
    "encoder_",
    "device_",
    "n_iter_",
    "t_",
    "history_",
    "key_init_info_",
    "_rng",
)


#: Named parameter sets for :meth:`DKVBClassifier.from_preset`.
PRESETS = {
    "paper": dict(
        n_heads=256, n_keys=4096, key_dim=14, projection="random", top_k=1,
        decoder="sgd", temperature=1.0, key_init="kmeans", key_init_epochs=10,
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
    n_heads : int, default=256
        Number of heads (codebooks) C.
    n_keys : int, default=4096
        Keys per head M: the main capacity knob.
    key_dim : int, default=14
        Key dimension d. Ignored with ``projection="chunk"`` (then ``D // C``).
    projection : {"random", "chunk"}, default="random"
        ``"random"``: a fixed Gaussian projection per head with L2-normalised
        columns. ``"chunk"``: split the input into ``n_heads`` equal slices.
    top_k : int, default=1
        Keys selected per head; their values are averaged.
    decoder : {"logp", "vote", "sgd"}, default="logp"
        ``"logp"``/``"vote"``: decoders computed from per-key class counts in a
        single pass (no learning rate, no epochs, order-independent); see
        Notes. ``"sgd"``: the paper's trained values with a mean decoder
        (``DKVBClassifier.from_preset("paper")`` sets up the paper's recipe).
        ``logp`` is the default because it matched or beat ``sgd`` in accuracy
        with calibrated probabilities at a fraction of the cost
        (``docs/results.md``).
    count_smoothing : float, default=0.1
        Additive smoothing ``a`` of the count decoders.
    temperature : float or "auto", default="auto"
        Scores are divided by it before the softmax of :meth:`predict_proba`
        (predictions never change). ``"auto"``: ``n_heads * top_k / 4`` for
        ``logp``, whose score sums that many strongly correlated per-head
        log-likelihoods and is over-confident by roughly that factor; ``1``
        otherwise.
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
    input_transform : {None, "pca-whiten"}, default=None
        Optional unsupervised transform fitted together with the keys on the
        same unlabeled data: PCA-whitening then L2 normalisation.
    input_transform_components : int, default=64
        Components kept by ``"pca-whiten"``.
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
        Storage of the value table of the ``sgd`` decoder (``C * M * K``
        numbers). Half precision halves it (4 -> 2 GiB for 1000 classes at the
        paper's size) at a cost of ~0.3 points measured on Fashion-MNIST
        (``benchmarks/README.md``); softmax and gradients stay in float32.
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
        The torch module: projection, keys, values and per-key class counts.
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
    are exactly class-incremental.

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
        "n_heads": [Interval(Integral, 1, None, closed="left")],
        "n_keys": [Interval(Integral, 1, None, closed="left")],
        "key_dim": [Interval(Integral, 1, None, closed="left")],
        "projection": [StrOptions({"random", "chunk"})],
        "top_k": [Interval(Integral, 1, None, closed="left")],
        "decoder": [StrOptions(set(DECODERS))],
        "count_smoothing": [Interval(Real, 0, None, closed="neither")],
        "temperature": [Interval(Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "key_init": [StrOptions({"kmeans", "random"})],
        "key_init_epochs": [Interval(Integral, 0, None, closed="left")],
        "key_init_batch_size": [Interval(Integral, 1, None, closed="left")],
        "key_init_decay": [Interval(Real, 0, 1, closed="left")],
        "key_init_eps": [Interval(Real, 0, None, closed="left")],
        "input_transform": [None, StrOptions({"pca-whiten"})],
        "input_transform_components": [Interval(Integral, 1, None, closed="left")],
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
        n_heads=256,
        n_keys=4096,
        key_dim=14,
        *,
        projection="random",
        top_k=1,
        decoder="logp",
        count_smoothing=0.1,
        temperature="auto",
        key_init="kmeans",
        key_init_epochs=10,
        key_init_batch_size=1024,
        key_init_decay=0.95,
        key_init_eps=1e-5,
        input_transform=None,
        input_transform_components=64,
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
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Initialise keys on ``X`` and train the values on ``(X, y)``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Inputs, or raw inputs of the ``encoder``.
        y : array-like of shape (n_samples,)
            Labels of any type scikit-learn accepts.
        sample_weight : array-like of shape (n_samples,), default=None

        Returns
        -------
        self : DKVBClassifier
        """
        keep = self.warm_start and hasattr(self, "bottleneck_")
        with _RestoreOnError(self):
            Z, y, sample_weight = self._validate_xy(X, y, sample_weight, reset=not keep)
            if not keep:
                self._reset()
                self._init_keys(Z)
                classes = np.unique(y)
                self.classes_ = classes
                self.bottleneck_.add_classes(len(classes))
            else:
                self._add_labels(y, classes=None, sort=True)
            self._train(Z, y, sample_weight, self.max_epochs, call="fit")
            self.n_iter_ = self.max_epochs
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """Train on one batch of a stream; ``classes_`` grows with new labels.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        classes : array-like of shape (n_classes,), default=None
            Labels to declare up front (optional: with ``new_classes="grow"``
            unseen labels are added in order of arrival).
        sample_weight : array-like of shape (n_samples,), default=None

        Returns
        -------
        self : DKVBClassifier
        """
        first = not hasattr(self, "bottleneck_")
        with _RestoreOnError(self):
            Z, y, sample_weight = self._validate_xy(X, y, sample_weight, reset=first)
            if classes is not None:
                classes = np.asarray(classes)
                check_classification_targets(classes)
            new = self._check_labels(y, classes)
            if first:
                self._reset()
                self._init_keys(Z)
            self._add_labels(y, classes, sort=False, checked_new=new)
            self._train(Z, y, sample_weight, self.partial_fit_epochs, call="partial_fit")
            self.n_iter_ = getattr(self, "n_iter_", 0) + self.partial_fit_epochs
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_keys(self, X, y=None):
        """Initialise the keys (and input transform) on unlabeled data.

        Learned values and classes are discarded; later :meth:`partial_fit`
        calls, or :meth:`fit` with ``warm_start=True``, keep these keys.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
        y : ignored

        Returns
        -------
        self : DKVBClassifier
        """
        with _RestoreOnError(self):
            Z = self._validate_x(X, reset=True)
            self._reset()
            self._init_keys(Z)
            for attr in ("classes_", "n_iter_"):
                self.__dict__.pop(attr, None)
        return self

    def decision_function(self, X):
        """Class scores, shape (n_samples, n_classes), or (n_samples,) for two classes.

        ``sgd``: mean of the selected values; ``vote``: mean smoothed class
        frequency; ``logp``: summed log smoothed class frequency. With two
        classes, the score of ``classes_[1]`` minus that of ``classes_[0]``
        (scikit-learn's binary convention).
        """
        check_is_fitted(self)
        Z = self._validate_x(X, reset=False)
        scores = self._scores(Z).double()
        if scores.shape[1] == 2:
            scores = scores[:, 1] - scores[:, 0]
        return scores.cpu().numpy()

    def predict_proba(self, X):
        """Class probabilities, shape (n_samples, n_classes); rows sum to 1."""
        check_is_fitted(self)
        Z = self._validate_x(X, reset=False)
        return self._proba(self._scores(Z)).cpu().numpy()

    def predict_log_proba(self, X):
        """Logarithm of :meth:`predict_proba`."""
        check_is_fitted(self)
        Z = self._validate_x(X, reset=False)
        return self._log_proba(self._scores(Z)).cpu().numpy()

    def predict(self, X):
        """Most probable class of each sample."""
        check_is_fitted(self)
        Z = self._validate_x(X, reset=False)
        return self.classes_[self._scores(Z).argmax(dim=1).cpu().numpy()]

    def key_indices(self, X, *, prune=None):
        """Selected key of each head, shape (n_samples, n_heads, top_k).

        Parameters
        ----------
        X : {array-like, sparse matrix}
        prune : bool, default=None
            Skip never-trained keys; defaults to ``prune_unused_keys``.
        """
        check_is_fitted(self, "bottleneck_")
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
            if reset:
                self.encoder_ = encoder
                self.device_ = device
            elif Z.shape[1] != self.bottleneck_.n_features:
                raise ValueError(
                    f"The encoder produced {Z.shape[1]} features but the model was "
                    f"fitted on {self.bottleneck_.n_features}."
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
                raise ValueError(
                    f"{type(self).__name__} requires y to be passed, but the target y is None."
                )
            y = column_or_1d(y, warn=True)
            Z = self._validate_x(X, reset=reset)
            if y.shape[0] != Z.shape[0]:
                raise ValueError(
                    f"Found input variables with inconsistent numbers of samples: [{Z.shape[0]}, {y.shape[0]}]."
                )
        else:
            Z, y = self._validate_tabular(X, y, reset)
        check_classification_targets(y)
        sample_weight = _check_sample_weight(sample_weight, Z, dtype=np.float64)
        if np.any(sample_weight < 0):
            raise ValueError("sample_weight must be non-negative.")
        return Z, y, sample_weight

    def _as_model_input(self, X):
        if sp.issparse(X):
            return X.astype(np.float32).tocsr()
        return torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=self.device_)

    def _check_labels(self, y, classes):
        """Labels of ``y`` (and ``classes``) not yet in ``classes_``; raise if growth is off."""
        seen = getattr(self, "classes_", None)
        incoming = y if classes is None else np.concatenate([np.asarray(classes).ravel(), y])
        _, first_pos = np.unique(incoming, return_index=True)
        ordered = incoming[np.sort(first_pos)]
        if seen is None:
            return ordered
        kinds = {seen.dtype.kind, ordered.dtype.kind}
        # Integers mix with integers and text with text; anything else is a type clash.
        if len(kinds) > 1 and not kinds <= {"i", "u"} and not kinds <= {"U", "O", "S"}:
            raise TypeError(
                f"Labels of type {ordered.dtype} cannot be mixed with the fitted "
                f"classes_ of type {seen.dtype}."
            )
        new = ordered[~np.isin(ordered, seen)]
        if len(new) and self.new_classes == "error":
            raise ValueError(
                f"y contains labels not seen before: {new.tolist()}; known classes_ are "
                f"{seen.tolist()}. Set new_classes='grow' to add them, or declare all "
                "classes on the first partial_fit call with classes=."
            )
        return new

    def _add_labels(self, y, classes, sort, checked_new=None):
        """Append unseen labels to ``classes_`` (declared ``classes`` sorted first, then arrival order)."""
        new = self._check_labels(y, classes) if checked_new is None else checked_new
        if not hasattr(self, "classes_"):
            if classes is not None:
                extra = new[~np.isin(new, classes)]  # keeps arrival order
                base = np.unique(classes)
                new = np.concatenate([base, extra]) if len(extra) else base
            self.classes_ = np.asarray(new)
            self.bottleneck_.add_classes(len(self.classes_))
            return
        if len(new):
            if sort:
                new = np.sort(new)
            self.classes_ = np.concatenate([self.classes_, new])
            self.bottleneck_.add_classes(len(new))

    def _encode_labels(self, y):
        sorter = np.argsort(self.classes_, kind="stable")
        pos = np.searchsorted(self.classes_, y, sorter=sorter)
        return sorter[pos]

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

    def _init_keys(self, Z):
        n = Z.shape[0]
        if self.input_transform is not None:
            sample = self._rng.choice(n, size=min(n, 20000), replace=False)
            rows = self._rows(Z, np.sort(sample))
            self.input_transform_ = InputTransform(self.input_transform, self.input_transform_components).fit(
                rows.to_dense() if rows.layout == torch.sparse_csr else rows
            )
            n_features = self.input_transform_.n_features_out_
        else:
            self.input_transform_ = None
            n_features = Z.shape[1]
        key_dim = self.key_dim
        if self.projection == "chunk":
            if n_features % self.n_heads:
                raise ValueError(
                    f"projection='chunk' needs the number of features ({n_features}) to be "
                    f"divisible by n_heads ({self.n_heads})."
                )
            key_dim = n_features // self.n_heads
        if self.top_k > self.n_keys:
            raise ValueError(f"top_k={self.top_k} must not exceed n_keys={self.n_keys}.")
        gen = torch.Generator().manual_seed(self._torch_seed())
        self.bottleneck_ = DiscreteKeyValueBottleneck(
            n_features,
            self.n_heads,
            self.n_keys,
            key_dim,
            projection=self.projection,
            top_k=self.top_k,
            values_dtype=self.values_dtype,
            generator=gen,
        ).to(self.device_)

        def query_fn(rows):
            return self._queries(self._rows(Z, np.asarray(rows)))

        if self.key_init == "random" or self.key_init_epochs == 0:
            keys = init_keys_random(query_fn, n, self.n_keys, self._rng)
            info = {"method": "random"}
        else:
            keys, info = init_keys_kmeans(
                query_fn,
                n,
                self.n_keys,
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

    # ---------------------------------------------------------------- lookup
    def _search_blocks(self, Z, prune):
        """Yield ``(rows, idx)``: each block's slice and its key indices (b, C, k).

        Only one block's queries and indices exist at a time, so memory is
        bounded by the block size whatever ``n`` is.
        """
        bias = self.bottleneck_.search_bias(prune)
        starts = range(0, Z.shape[0], _BLOCK_ROWS)
        with torch.no_grad():
            for start in tqdm(starts, desc="key search", disable=not self.verbose, leave=False):
                rows = slice(start, start + _BLOCK_ROWS)
                yield rows, self.bottleneck_.lookup(self._queries(self._rows(Z, rows)), bias=bias)

    def _indices(self, Z, prune):
        """Key indices (n, C, k) of all rows, as int32."""
        module = self.bottleneck_
        out = torch.empty((Z.shape[0], module.n_heads, module.top_k), dtype=torch.int32, device=self.device_)
        for rows, idx in self._search_blocks(Z, prune):
            out[rows] = idx.to(torch.int32)
        return out

    def _scores(self, Z):
        """Decoded scores (n, K), searched and decoded block by block."""
        module = self.bottleneck_
        out = torch.empty((Z.shape[0], module.n_classes), dtype=torch.float32, device=self.device_)
        for rows, idx in self._search_blocks(Z, self.prune_unused_keys):
            out[rows] = module.decode(idx, self.decoder, smoothing=self.count_smoothing)
        return out

    def _temperature(self):
        if self.temperature != "auto":
            return float(self.temperature)
        if self.decoder == "logp":
            return self.bottleneck_.n_heads * self.bottleneck_.top_k / 4.0
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
    def _train(self, Z, y, sample_weight, epochs, call):
        """Index once, then count and run the SGD epochs over cached indices."""
        idx = self._indices(Z, prune=False)
        y_enc = torch.as_tensor(self._encode_labels(y), device=self.device_)
        w = torch.as_tensor(sample_weight, device=self.device_, dtype=torch.float32)
        self.bottleneck_.add_counts(idx, y_enc, w)
        self.t_ += float(sample_weight.sum())
        n = idx.shape[0]
        if self.decoder != "sgd":
            self.history_.append({"call": call, "epoch": 0, "n_samples": n, "loss": None})
            return
        # Rows of the flattened value table, once per call (C * M < 2**31).
        flat = self.bottleneck_.flat_index(idx).to(torch.int32)
        keep = 1.0 - self.dropout
        mask_gen = torch.Generator(device=self.device_).manual_seed(self._torch_seed()) if self.dropout else None
        n_sel = self.bottleneck_.n_heads * self.bottleneck_.top_k
        w_sq = sample_weight**2  # per-batch sums feed the clip bound without a device sync
        for epoch in tqdm(range(epochs), desc=call, disable=not self.verbose):
            order = self._rng.permutation(n) if self.shuffle else np.arange(n)
            order_t = torch.as_tensor(order, device=self.device_)
            total = torch.zeros((), device=self.device_)
            sq = w_sq[order]
            for start in range(0, n, self.batch_size):
                b = order_t[start : start + self.batch_size]
                mask = None
                if mask_gen is not None:
                    mask = (
                        torch.rand((len(b), n_sel), generator=mask_gen, device=self.device_) < keep
                    ).float() / keep
                total += len(b) * self.bottleneck_.sgd_step(
                    flat[b],
                    y_enc[b],
                    w[b],
                    lr=self.learning_rate,
                    label_smoothing=self.label_smoothing,
                    grad_clip=self.grad_clip,
                    head_mask=mask,
                    weight_sq_sum=float(sq[start : start + self.batch_size].sum()),
                    mask_scale=1.0 / keep,
                )
            # One host sync per epoch, not per step.
            self.history_.append({"call": call, "epoch": epoch, "n_samples": n, "loss": float(total) / n})

    # ------------------------------------------------------------ pickling
    def __getstate__(self):
        # Copy: BaseEstimator may hand back the live __dict__.
        state = dict(super().__getstate__())
        module = state.get("bottleneck_")
        if module is not None:
            # Host-memory arrays: a model trained on a GPU unpickles anywhere.
            state["bottleneck_"] = {
                "config": module.config(),
                # numpy, not tensors: skops.io stores arrays natively but not tensors.
                # (bfloat16 has no numpy type: stored as float32, exactly, and
                # cast back when the module is rebuilt from its config.)
                "state": {
                    k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy().copy()
                    for k, v in module.state_dict().items()
                },
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
            tensors = {k: torch.as_tensor(v) for k, v in saved["state"].items()}
            state["bottleneck_"] = DiscreteKeyValueBottleneck.from_state(saved["config"], tensors, device or "cpu")
        transform = state.get("input_transform_")
        if transform is not None and device is not None:
            state["input_transform_"] = transform.to(device)
        encoder = state.get("encoder_")
        if encoder is not None and device is not None and hasattr(encoder, "to"):
            encoder.to(device)
        super().__setstate__(state)


class _RestoreOnError:
    """Put the fitted attributes back if a call fails.

    Input validation runs before anything is mutated, so on bad input only
    the attributes that ``validate_data`` resets (feature count and names) and
    those a refit replaces need restoring; a refit builds a new module, so the
    old one is kept by reference, not copied.
    """

    def __init__(self, est):
        self.est = est

    def __enter__(self):
        d = self.est.__dict__
        self.saved = {k: d[k] for k in _STATE_ATTRS if k in d}
        self.rng_state = d["_rng"].get_state() if "_rng" in d else None
        self.history_len = len(d["history_"]) if "history_" in d else None
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        d = self.est.__dict__
        for k in _STATE_ATTRS:
            d.pop(k, None)
        d.update(self.saved)
        if self.rng_state is not None:
            d["_rng"].set_state(self.rng_state)
        if self.history_len is not None:
            del d["history_"][self.history_len :]
        return False
