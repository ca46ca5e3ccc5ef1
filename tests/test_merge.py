"""merge(): shard models add up to sequential training."""

import copy

import numpy as np
import pytest
from sklearn.datasets import load_digits

from skdkvb import DKVBClassifier
from skdkvb.merge import merge

DIGITS_X, DIGITS_Y = load_digits(return_X_y=True)
ALL = np.arange(10)


def _start(X, **kw):
    params = dict(n_heads=16, n_keys=64, key_dim=4, key_init_epochs=2, random_state=0, device="cpu")
    params.update(kw)
    return DKVBClassifier(**params).fit_keys(X)


def _shards(y, groups):
    return [np.isin(y, g) for g in groups]


def _sequential(start, X, y, shards, **fit_kw):
    seq = copy.deepcopy(start)
    for s in shards:
        seq.partial_fit(X[s], y[s], **fit_kw)
    return seq


def _selected(model, X):
    """Flat ids of the value rows that X selects."""
    b = model.bottleneck_
    idx = model.key_indices(X, prune=False)
    return np.unique(idx + (np.arange(b.n_heads) * b.n_keys)[None, :, None])


@pytest.mark.parametrize("decoder", ["vote", "logp"])
def test_count_decoders_merge_exactly(decoder):
    X, y = DIGITS_X, DIGITS_Y
    start = _start(X, decoder=decoder)
    shards = _shards(y, [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]])
    models = [copy.deepcopy(start).partial_fit(X[s], y[s]) for s in shards]
    seq = _sequential(start, X, y, shards)
    merged = merge(models)
    assert np.array_equal(merged.classes_, seq.classes_)
    assert np.array_equal(merged.bottleneck_.counts.numpy(), seq.bottleneck_.counts.numpy())
    assert np.array_equal(merged.predict_proba(X), seq.predict_proba(X))
    assert merged.t_ == seq.t_ == len(y)
    # Inputs are left alone.
    assert len(models[0].classes_) == 3


def _separated_blobs(rng, n=60, d=8):
    """Two class groups far apart in every coordinate: chunk heads never share keys."""
    X = np.concatenate([rng.normal(-6, 1, (2 * n, d)), rng.normal(6, 1, (2 * n, d))])
    y = np.repeat([0, 1, 2, 3], n)
    X[y % 2 == 1] += 1.5  # classes within a group differ a little
    return X.astype(np.float32), y


def test_sgd_merge_is_exact_when_keys_do_not_overlap():
    X, y = _separated_blobs(np.random.RandomState(0))
    start = _start(
        X, decoder="sgd", n_heads=4, n_keys=16, projection="chunk", shuffle=False, batch_size=32, partial_fit_epochs=3
    )
    shards = _shards(y, [[0, 1], [2, 3]])
    models = [copy.deepcopy(start).partial_fit(X[s], y[s], classes=[0, 1, 2, 3]) for s in shards]
    assert len(np.intersect1d(_selected(models[0], X[shards[0]]), _selected(models[1], X[shards[1]]))) == 0
    seq = _sequential(start, X, y, shards, classes=[0, 1, 2, 3])
    merged = merge(models)
    assert np.array_equal(merged.bottleneck_.values.data.numpy(), seq.bottleneck_.values.data.numpy())
    assert np.array_equal(merged.predict_proba(X), seq.predict_proba(X))
    assert merged.n_iter_ == seq.n_iter_ and len(merged.history_) == len(seq.history_)


def test_sgd_merge_is_close_on_digits_with_overlapping_keys():
    X, y = DIGITS_X, DIGITS_Y
    start = _start(X, decoder="sgd", partial_fit_epochs=3, shuffle=False)
    shards = _shards(y, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    models = [copy.deepcopy(start).partial_fit(X[s], y[s], classes=ALL) for s in shards]
    overlap = np.intersect1d(_selected(models[0], X[shards[0]]), _selected(models[1], X[shards[1]]))
    assert len(overlap) > 0
    seq = _sequential(start, X, y, shards, classes=ALL)
    merged = merge(models)
    # Shared keys make shard B's updates see A's values in sequence: a real, small gap.
    diff = np.abs(merged.bottleneck_.values.data.numpy() - seq.bottleneck_.values.data.numpy())
    assert 0 < diff.max() < 0.1 * np.abs(seq.bottleneck_.values.data.numpy()).max()
    agree = np.mean(merged.predict(X) == seq.predict(X))
    assert agree > 0.95
    assert abs(merged.score(X, y) - seq.score(X, y)) < 0.05


def test_classes_union_in_arrival_order_and_columns_by_label():
    X, y = DIGITS_X, DIGITS_Y
    labels = np.array(list("abcdefghij"))[y]
    start = _start(X, decoder="vote")
    s1, s2 = _shards(y, [[5, 1], [1, 2, 9]])  # label "b" in both shards
    a = copy.deepcopy(start).partial_fit(X[s1], labels[s1])
    b = copy.deepcopy(start).partial_fit(X[s2], labels[s2])
    merged = merge([a, b])
    assert list(merged.classes_) == list(a.classes_) + [c for c in b.classes_ if c not in a.classes_]
    col = {c: j for j, c in enumerate(merged.classes_)}
    counts = merged.bottleneck_.counts.numpy()
    expected_b = (
        a.bottleneck_.counts.numpy()[:, :, list(a.classes_).index("b")]
        + b.bottleneck_.counts.numpy()[:, :, list(b.classes_).index("b")]
    )
    assert np.array_equal(counts[:, :, col["b"]], expected_b)
    assert np.array_equal(counts[:, :, col["j"]], b.bottleneck_.counts.numpy()[:, :, list(b.classes_).index("j")])


def test_merge_relative_to_a_shared_base():
    X, y = DIGITS_X, DIGITS_Y
    start = _start(X, decoder="logp")
    base = copy.deepcopy(start).partial_fit(X[y < 4], y[y < 4])
    shards = _shards(y, [[4, 5, 6], [7, 8, 9]])
    models = [copy.deepcopy(base).partial_fit(X[s], y[s]) for s in shards]
    seq = _sequential(base, X, y, shards)
    merged = merge(models, base=base)
    assert np.array_equal(merged.bottleneck_.counts.numpy(), seq.bottleneck_.counts.numpy())
    assert merged.t_ == seq.t_
    assert np.array_equal(merged.predict(X), seq.predict(X))


def test_merge_refuses_models_with_other_keys():
    X, y = DIGITS_X, DIGITS_Y
    a = _start(X, decoder="vote").partial_fit(X, y)
    with pytest.raises(ValueError, match="other keys"):
        merge([a, _start(X, decoder="vote", random_state=1).partial_fit(X, y)])
    with pytest.raises(ValueError, match="n_keys=32"):
        merge([a, _start(X, decoder="vote", n_keys=32).partial_fit(X, y)])
    with pytest.raises(ValueError, match="features"):
        merge([a, _start(X[:, :32], decoder="vote").partial_fit(X[:, :32], y)])
    strings = copy.deepcopy(a)
    strings.classes_ = a.classes_.astype(str)
    with pytest.raises(TypeError, match="label types"):
        merge([a, strings])
    with pytest.raises(ValueError, match="at least one"):
        merge([])
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        merge([a, DKVBClassifier()])


def test_sparse_count_tables_merge_exactly():
    from skdkvb._tables import CountTable

    X, y = DIGITS_X, DIGITS_Y
    start = _start(X, decoder="logp")
    shards = _shards(y, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    models = [copy.deepcopy(start).partial_fit(X[s], y[s]) for s in shards]
    for m in models:  # what a model with many classes holds
        b = m.bottleneck_
        table = CountTable(b.count_table.n_rows, b.n_classes, layout="sparse")
        table.add_table(b.count_table, np.arange(b.n_classes))
        b.count_table = table
    merged = merge(models)
    seq = _sequential(start, X, y, shards)
    assert merged.bottleneck_.count_table.layout == "dense"  # the automatic choice at this size
    assert np.array_equal(merged.bottleneck_.counts.numpy(), seq.bottleneck_.counts.numpy())
    np.testing.assert_allclose(merged.predict_proba(X), seq.predict_proba(X), rtol=1e-6, atol=1e-9)


def test_sgd_merge_relative_to_a_shared_base_keeps_usage():
    X, y = DIGITS_X, DIGITS_Y
    start = _start(X, decoder="sgd", shuffle=False)
    base = copy.deepcopy(start).partial_fit(X[y < 4], y[y < 4], classes=ALL)
    shards = _shards(y, [[4, 5, 6], [7, 8, 9]])
    models = [copy.deepcopy(base).partial_fit(X[s], y[s]) for s in shards]
    merged = merge(models, base=base)
    seq = _sequential(base, X, y, shards)
    assert np.array_equal(merged.bottleneck_.usage.numpy(), seq.bottleneck_.usage.numpy())
    assert merged.t_ == seq.t_
    assert merged.bottleneck_.count_table is None
