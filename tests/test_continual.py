"""Streams, the runner and ContinualReport."""

import json

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.svm import SVC

from skdkvb import DKVBClassifier
from skdkvb.continual import (
    ContinualReport,
    class_incremental_split,
    evaluate_seeds,
    evaluate_stream,
    iid_stream,
    summarize,
    unlabeled_split,
)
from skdkvb.continual.baselines import NearestClassMean, make_linear_probe
from skdkvb.continual.datasets import TOY_2D_CLASS_ORDER, make_toy_2d


@pytest.fixture
def blobs10():
    X, y = make_blobs(n_samples=400, centers=10, n_features=5, cluster_std=0.5, random_state=0)
    return X, y


def test_split_every_class_in_exactly_one_task(blobs10):
    X, y = blobs10
    stream = class_incremental_split(X, y, n_tasks=5, random_state=3)
    assert len(stream) == 5
    tasks = [set(c.tolist()) for c in stream.task_classes]
    assert all(len(t) == 2 for t in tasks)
    assert set().union(*tasks) == set(range(10))
    assert sum(len(t) for t in tasks) == 10
    # Each step holds exactly the samples of its classes, nothing lost.
    for (_X_t, y_t), classes in zip(stream, stream.task_classes):
        assert set(np.unique(y_t)) == set(classes.tolist())
        assert y_t.size == np.isin(y, classes).sum()
    assert sum(yt.size for _, yt in stream) == y.size
    # Rows keep their labels: every (x, y) pair is one of the input pairs.
    X_all = np.concatenate([s[0] for s in stream])
    y_all = np.concatenate([s[1] for s in stream])
    order = np.lexsort(X_all.T)
    ref = np.lexsort(X.T)
    np.testing.assert_array_equal(y_all[order], y[ref])


def test_seeded_order_reproducible_and_seed_dependent(blobs10):
    X, y = blobs10
    a = class_incremental_split(X, y, random_state=1)
    b = class_incremental_split(X, y, random_state=1)
    np.testing.assert_array_equal(a.class_order, b.class_order)
    for (Xa, ya), (Xb, yb) in zip(a, b):
        np.testing.assert_array_equal(Xa, Xb)
        np.testing.assert_array_equal(ya, yb)
    orders = {tuple(class_incremental_split(X, y, random_state=s).class_order) for s in range(5)}
    assert len(orders) > 1


def test_fixed_and_explicit_orders(blobs10):
    X, y = blobs10
    fixed = class_incremental_split(X, y, n_tasks=3, class_order="fixed")
    assert [c.tolist() for c in fixed.task_classes] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    explicit = class_incremental_split(X, y, n_tasks=5, class_order=order)
    assert explicit.class_order.tolist() == order


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_tasks": 0}, "n_tasks"),
        ({"n_tasks": 11}, "n_tasks"),
        ({"class_order": "sorted"}, "class_order"),
        ({"class_order": [0, 1, 2]}, "every class"),
        ({"class_order": [0] * 10}, "every class"),
    ],
)
def test_split_rejects_bad_arguments(blobs10, kwargs, match):
    X, y = blobs10
    with pytest.raises(ValueError, match=match):
        class_incremental_split(X, y, **kwargs)


def test_iid_stream_and_unlabeled_split(blobs10):
    X, y = blobs10
    stream = class_incremental_split(X, y, random_state=0)
    iid = stream.iid(n_steps=2)
    assert iid.kind == "iid" and len(iid) == 2
    # Same data, same task partition, but every step mixes classes.
    assert sum(yt.size for _, yt in iid) == y.size
    assert all(np.unique(yt).size > 2 for _, yt in iid)
    assert [c.tolist() for c in iid.task_classes] == [c.tolist() for c in stream.task_classes]
    assert len(iid_stream(X, y).task_classes) == 10
    X_u, X_l, y_l = unlabeled_split(X, y, unlabeled_size=0.25, random_state=0)
    assert X_u.shape[0] == 100 and X_l.shape[0] == 300 and y_l.shape[0] == 300
    assert np.unique(y_l).size == 10


def test_runner_on_tiny_stream_ncm(blobs10):
    X, y = blobs10
    stream = class_incremental_split(X[:300], y[:300], random_state=0)
    report = evaluate_stream(NearestClassMean(), stream, X[300:], y[300:], name="ncm")
    R = report.accuracy_matrix
    assert R.shape == (5, 5)
    # Class-incremental: a task never trained on cannot be predicted.
    assert np.all(R[np.triu_indices(5, k=1)] == 0.0)
    # Well-separated blobs: NCM is nearly perfect and forgets nothing.
    assert report.average_accuracy > 0.95
    assert abs(report.forgetting) < 0.05
    assert report.per_class_accuracy.shape == (5, 10)
    assert len(report.fit_times) == 5 and report.mode == "partial_fit"
    assert report.final_accuracy == pytest.approx(report.average_accuracy, abs=0.05)
    assert 0.0 <= report.ece <= 1.0 and np.isfinite(report.log_loss)
    curve = report.average_accuracy_curve
    assert curve.shape == (5,) and curve[-1] == pytest.approx(report.average_accuracy)


def test_linear_probe_forgets_and_refit_does_not(blobs10):
    X, y = blobs10
    stream = class_incremental_split(X[:300], y[:300], random_state=0)
    seq = evaluate_stream(make_linear_probe(random_state=0), stream, X[300:], y[300:], epochs=3)
    refit = evaluate_stream(SVC(), stream, X[300:], y[300:])  # no partial_fit
    assert refit.mode == "refit"
    assert np.isnan(refit.log_loss)  # SVC without probability=True
    assert refit.average_accuracy > 0.95
    assert seq.forgetting > refit.forgetting + 0.2


def test_dkvb_keys_from_unlabeled_data(blobs10):
    X, y = blobs10
    stream = class_incremental_split(X[:300], y[:300], random_state=0)
    est = DKVBClassifier(
        n_heads=8, n_keys=32, key_dim=3, decoder="logp", key_init_epochs=2, device="cpu", random_state=0
    )
    report = evaluate_stream(est, stream, X[300:], y[300:], X_unlabeled=X[:300])
    assert report.key_init_time > 0
    assert report.average_accuracy > 0.9
    assert report.forgetting < 0.1
    # The given estimator is cloned, not trained.
    assert not hasattr(est, "classes_")


def test_callback_and_in_place(blobs10):
    X, y = blobs10
    stream = class_incremental_split(X, y, n_tasks=2, random_state=0)
    seen = []
    est = NearestClassMean()
    evaluate_stream(est, stream, X, y, clone=False, callback=lambda t, e: seen.append((t, e.classes_.size)))
    assert seen == [(0, 10), (1, 10)]  # classes= announced on the first call
    assert est.class_count_.sum() == y.size


def test_runner_rejects_bad_arguments(blobs10):
    X, y = blobs10
    stream = class_incremental_split(X, y, random_state=0)
    with pytest.raises(ValueError, match="mode"):
        evaluate_stream(NearestClassMean(), stream, X, y, mode="online")
    with pytest.raises(ValueError, match="epochs"):
        evaluate_stream(NearestClassMean(), stream, X, y, epochs=0)
    with pytest.raises(ValueError, match="partial_fit"):
        evaluate_stream(SVC(), stream, X, y, mode="partial_fit")
    with pytest.raises(TypeError, match="Stream"):
        evaluate_stream(NearestClassMean(), list(stream), X, y)


def test_report_serialisation_and_summary(blobs10, tmp_path):
    X, y = blobs10
    reports = evaluate_seeds(lambda s: NearestClassMean(), X[:300], y[:300], X[300:], y[300:], seeds=[0, 1], name="ncm")
    reports += evaluate_seeds(
        lambda s: NearestClassMean(), X[:300], y[:300], X[300:], y[300:], seeds=[0], iid=True, name="ncm-iid"
    )
    assert [r.seed for r in reports] == [0, 1, 0]
    assert reports[2].accuracy_matrix.shape == (1, 5)
    assert np.isnan(reports[2].forgetting) and np.isnan(reports[2].backward_transfer)
    path = tmp_path / "r.json"
    text = reports[0].to_json(path)
    loaded = json.loads(path.read_text())
    assert loaded == json.loads(text)
    assert loaded["average_accuracy"] == pytest.approx(reports[0].average_accuracy)
    assert np.allclose(loaded["accuracy_matrix"], reports[0].accuracy_matrix)
    json.dumps(reports[2].to_dict(), allow_nan=False)  # NaN written as null
    rows = summarize(reports)
    assert [r["method"] for r in rows] == ["ncm", "ncm-iid"]
    assert rows[0]["n_seeds"] == 2
    accs = [r.average_accuracy for r in reports[:2]]
    assert rows[0]["average_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert rows[0]["average_accuracy_std"] == pytest.approx(np.std(accs))
    frame = reports[0].to_frame()
    assert len(frame) == 25 and set(frame.columns) >= {"method", "step", "task", "accuracy"}
    assert summarize(reports, as_frame=True).shape[0] == 2


def test_toy_reaches_target_and_linear_probe_does_not():
    X, y = make_toy_2d(random_state=0)
    X_test, y_test = make_toy_2d(random_state=1)
    stream = class_incremental_split(X, y, n_tasks=4, class_order=list(TOY_2D_CLASS_ORDER))
    assert [c.tolist() for c in stream.task_classes] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    dkvb = DKVBClassifier(
        n_heads=20, n_keys=20, key_dim=2, decoder="logp", key_init_epochs=10, device="cpu", random_state=0
    )
    report = evaluate_stream(dkvb, stream, X_test, y_test, X_unlabeled=X)
    assert report.average_accuracy >= 0.95
    probe = evaluate_stream(make_linear_probe(random_state=0), stream, X_test, y_test, epochs=20)
    assert probe.average_accuracy < 0.4


def test_report_plot():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    R = np.array([[1.0, 0.0], [0.8, 0.9]])
    report = ContinualReport("m", R, [[0], [1]], np.array([0, 1]), R, [0.0, 0.0])
    fig = report.plot()
    image = fig.axes[0].images[0]
    np.testing.assert_allclose(image.get_array(), R)


def test_decision_regions_and_benchmark_figure():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from skdkvb.continual.plotting import plot_benchmark, plot_decision_regions

    X, y = make_toy_2d(n_samples_per_class=20, random_state=0)
    stream = class_incremental_split(X, y, n_tasks=4, class_order=list(TOY_2D_CLASS_ORDER))
    snaps = []
    report = evaluate_stream(
        NearestClassMean(), stream, X, y, name="ncm", callback=lambda t, e: snaps.append(clone_predict(e))
    )
    fig = plot_decision_regions({"ncm": snaps}, X, y, resolution=20)
    assert len(fig.axes) == 4
    # After the first task only classes 0 and 4 can be predicted anywhere.
    assert set(np.unique(snaps[0](X))) == {0, 4}
    fig = plot_benchmark([report, report], title="t")
    assert len(fig.axes) >= 2
    with pytest.raises(ValueError, match="2 features"):
        plot_decision_regions({"ncm": snaps}, np.zeros((3, 3)), y[:3])


def clone_predict(est):
    """Freeze a snapshot of a streaming estimator's predict."""
    import copy

    return copy.deepcopy(est).predict


def test_evaluate_stream_accepts_image_test_arrays():
    """4-D X_test goes to the estimator as it is (no "Found array with dim 4")."""
    from sklearn.datasets import load_digits
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    from skdkvb.continual import class_incremental_split, evaluate_stream
    from skdkvb.continual.baselines import NearestClassMean

    X, y = load_digits(return_X_y=True)
    flatten = FunctionTransformer(lambda Z: np.asarray(Z).reshape(len(Z), -1))
    stream = class_incremental_split(X[:1000], y[:1000], n_tasks=5, random_state=0)
    images = X[1000:].reshape(-1, 8, 8, 1)
    flat = evaluate_stream(make_pipeline(flatten, NearestClassMean()), stream, X[1000:], y[1000:], mode="refit")
    image = evaluate_stream(make_pipeline(flatten, NearestClassMean()), stream, images, y[1000:], mode="refit")
    np.testing.assert_array_equal(image.accuracy_matrix, flat.accuracy_matrix)
    assert image.final_accuracy > 0.8
