"""The compatibility layer: skdkvb's own sample-weight policy, pipeline checks and timm cache lookup."""

import hashlib

import numpy as np
import pytest
import torch
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from skdkvb.utils._sklearn_compat import (
    check_sample_weight,
    final_estimator,
    timm_url_is_cached,
    validate_pipeline_steps,
)


def test_sample_weight_policy():
    np.testing.assert_array_equal(check_sample_weight(None, 3), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(check_sample_weight(2, 2), [2.0, 2.0])
    # A zero-weight batch is legal (a no-op in a stream) on every scikit-learn version.
    np.testing.assert_array_equal(check_sample_weight(np.zeros(4), 4), np.zeros(4))
    # Tensors are converted on the host, whatever their dtype or device.
    w = check_sample_weight(torch.tensor([0.5, 1.5], dtype=torch.float16), 2)
    assert w.dtype == np.float64 and w.tolist() == [0.5, 1.5]


@pytest.mark.parametrize(
    "weights, match",
    [
        ([1.0, -1.0], "non-negative; sample 1"),
        ([1.0, np.inf], "finite in float32; sample 1"),
        ([1e39, 1.0], "finite in float32; sample 0"),
        ([1.0], "1 entries but X has 2 samples"),
        ([[1.0, 1.0]], "1-D"),
        (["a", "b"], "numeric"),
    ],
)
def test_sample_weight_errors_name_the_sample(weights, match):
    with pytest.raises(ValueError, match=match):
        check_sample_weight(weights, 2)


@pytest.mark.parametrize(
    "steps, error, match",
    [
        ([("a", StandardScaler()), ("a", SGDClassifier())], ValueError, r"unique, got \['a'\]"),
        ([("a__b", StandardScaler()), ("c", SGDClassifier())], ValueError, "contains '__'"),
        ([("clf", SGDClassifier()), ("last", SGDClassifier())], TypeError, "step 'clf'.*no transform"),
        ([("s", StandardScaler()), ("last", object())], TypeError, "last step 'last'.*no fit"),
    ],
)
def test_validate_pipeline_steps_rejects(steps, error, match):
    pipe = Pipeline(steps)
    with pytest.raises(error, match=match):
        validate_pipeline_steps(pipe)
    # scikit-learn's own fit rejects the same pipelines.
    with pytest.raises((ValueError, TypeError)):
        pipe.fit(np.ones((4, 2)), [0, 1, 0, 1])


def test_validate_pipeline_steps_accepts_passthrough_and_final_estimator():
    pipe = Pipeline([("skip", "passthrough"), ("none", None), ("s", StandardScaler()), ("clf", SGDClassifier())])
    validate_pipeline_steps(pipe)
    assert final_estimator(pipe) is pipe.steps[-1][1]
    assert final_estimator(Pipeline([("s", StandardScaler()), ("end", None)])) == "passthrough"


def test_timm_url_is_cached_reads_the_hub_checkpoints_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    payload = b"weights"
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    url = f"https://example.org/models/net-{prefix}.pth?download=1"
    assert not timm_url_is_cached(url)
    (tmp_path / "checkpoints").mkdir()
    target = tmp_path / "checkpoints" / f"net-{prefix}.pth"
    target.write_bytes(payload)
    assert timm_url_is_cached(url)
    target.write_bytes(b"truncated")  # the hash prefix in the name no longer matches
    assert not timm_url_is_cached(url)
    assert timm_url_is_cached(url, check_hash=False)
    (tmp_path / "checkpoints" / "plain.pth").write_bytes(b"x")  # no hash in the name
    assert timm_url_is_cached("https://example.org/plain.pth")
