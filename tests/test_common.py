"""The whole scikit-learn estimator suite on small DKVB configurations."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from skdkvb import DKVBClassifier

_SMALL = dict(n_keys=16, key_init_epochs=2, max_epochs=5, device="cpu", random_state=0)

# Why these checks cannot hold for DKVB (the only expected failures):
_SAMPLE_WEIGHT_REASON = (
    "Keys are initialised by k-means on the inputs, so repeating a sample moves "
    "the keys, and the SGD decoder's mini-batches differ when rows are repeated; "
    "sample_weight is therefore not equivalent to repeating/removing samples. "
    "(The count decoders are exactly equivalent once keys are fixed, see "
    "test_classifier.py::test_count_decoder_weight_equals_repetition.)"
)
EXPECTED_FAILED = {
    "check_sample_weight_equivalence_on_dense_data": _SAMPLE_WEIGHT_REASON,
    "check_sample_weight_equivalence_on_sparse_data": _SAMPLE_WEIGHT_REASON,
}

ESTIMATORS = [
    # the paper's decoder with EMA k-means keys on random projections
    DKVBClassifier(n_heads=8, key_dim=2, decoder="sgd", **_SMALL),
    # count decoders, random keys, top-k > 1
    DKVBClassifier(n_heads=8, key_dim=2, decoder="vote", key_init="random", top_k=2, **_SMALL),
    DKVBClassifier(n_heads=8, key_dim=2, decoder="logp", dropout=0.2, **_SMALL),
    # one head that sees the whole input ("chunk" with C=1 works for any D)
    DKVBClassifier(n_heads=1, projection="chunk", decoder="sgd", **_SMALL),
    # the defaults (logp decoder, automatic temperature), k-means keys, PCA-whitening
    DKVBClassifier(n_heads=8, key_dim=2, input_transform="pca-whiten", input_transform_components=2, **_SMALL),
]


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=lambda est: EXPECTED_FAILED)
def test_sklearn_compatible(estimator, check):
    check(estimator)
