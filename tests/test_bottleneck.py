"""The torch bottleneck: the sparse SGD step equals autograd, decoders, growth."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skdkvb import DiscreteKeyValueBottleneck


def make_module(C=4, M=16, d=3, D=7, K=3, top_k=1, seed=0, decoder="sgd"):
    gen = torch.Generator().manual_seed(seed)
    m = DiscreteKeyValueBottleneck(D, C, M, d, n_classes=K, top_k=top_k, decoder=decoder, generator=gen)
    m.set_keys(torch.randn(C, M, d, generator=gen))
    if decoder == "sgd":
        set_values(m, torch.randn(C * M, K, generator=gen))
    return m


def set_values(m, dense):
    """Write dense (C * M, K) values into the module's value blocks."""
    for lo, hi, block in m.value_table.segments():
        block[:, : hi - lo] = dense[:, lo:hi]


def autograd_step(m, idx, y, w, lr, ls, clip, mask):
    """Reference: dense autograd + clip_grad_norm_ + torch.optim.SGD."""
    values = torch.nn.Parameter(m.values.detach().clone())
    flat = m.flat_index(idx)
    sel = values.view(-1, m.n_classes)[flat]
    n_sel = flat.shape[1]
    logits = (sel * mask.unsqueeze(-1)).sum(1) / n_sel if mask is not None else sel.mean(1)
    loss = (torch.nn.functional.cross_entropy(logits, y, reduction="none", label_smoothing=ls) * w).sum() / len(y)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([values], clip)
    opt = torch.optim.SGD([values], lr=lr)
    opt.step()
    return values.detach(), float(loss)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 30),
    top_k=st.integers(1, 3),
    clip=st.sampled_from([None, 1.0, 0.01]),
    dropout=st.booleans(),
    ls=st.sampled_from([0.0, 0.1]),
)
def test_sparse_sgd_step_equals_dense_autograd(seed, b, top_k, clip, dropout, ls):
    m = make_module(top_k=top_k, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(b, m.n_features, generator=gen)
    idx = m.lookup(m.project(z))
    y = torch.randint(0, m.n_classes, (b,), generator=gen)
    w = torch.rand(b, generator=gen) * 2
    mask = None
    if dropout:
        mask = (torch.rand(b, m.n_heads * top_k, generator=gen) < 0.7).float() / 0.7
    expected, expected_loss = autograd_step(m, idx, y, w, 0.3, ls, clip, mask)
    loss = m.sgd_step(idx, y, w, lr=0.3, label_smoothing=ls, grad_clip=clip, head_mask=mask)
    # Clipping uses a +1e-6 guard like clip_grad_norm_; float32 sums differ in order.
    torch.testing.assert_close(m.values.detach(), expected, rtol=1e-5, atol=1e-6)
    assert float(loss) == pytest.approx(expected_loss, rel=1e-5)


def test_untouched_rows_are_bit_identical():
    m = make_module(C=3, M=50)
    before = m.values.detach().clone()
    idx = torch.tensor([[[1], [2], [3]], [[1], [5], [6]]])
    m.sgd_step(idx, torch.tensor([0, 2]), torch.ones(2), lr=0.3)
    changed = (m.values.detach() != before).any(-1)
    expected = torch.zeros(3, 50, dtype=torch.bool)
    expected[0, 1] = expected[1, 2] = expected[1, 5] = expected[2, 3] = expected[2, 6] = True
    assert torch.equal(changed, expected)


def test_decoders_match_gather_reference():
    m = make_module(top_k=2)
    c = make_module(top_k=2, decoder="logp")
    c.counts = torch.randint(0, 5, (c.n_heads, c.n_keys, c.n_classes)).double()
    idx = m.lookup(m.project(torch.randn(9, m.n_features)))
    flat = m.flat_index(idx)
    K = m.n_classes
    torch.testing.assert_close(m.decode(idx, "sgd", block_size=4), m.values.detach().view(-1, K)[flat].mean(1))
    with pytest.raises(ValueError, match="Refit"):
        m.decode(idx, "logp")
    with pytest.raises(ValueError, match="Refit"):
        c.decode(idx, "sgd")
    m = c
    counts = m.counts.view(-1, K)[flat]
    freq = (counts + 0.5) / (counts.sum(-1, keepdim=True) + K * 0.5)
    torch.testing.assert_close(m.decode(idx, "vote", smoothing=0.5), freq.mean(1).float())
    torch.testing.assert_close(m.decode(idx, "logp", smoothing=0.5), freq.log().sum(1).float())
    with pytest.raises(ValueError, match="decoder"):
        m.decode(idx, "median")


def test_add_classes_keeps_old_columns_and_zero_initialises_new():
    m = make_module(K=2)
    old = m.values.detach().clone()
    m.add_classes(30)  # past the first block: a second block, the first is not copied
    first = m.value_table.blocks[0]
    assert m.values.shape[-1] == 32 and len(m.value_table.blocks) == 2
    assert m.value_table.blocks[0] is first
    assert torch.equal(m.values.detach()[..., :2], old)
    assert torch.count_nonzero(m.values.detach()[..., 2:]) == 0
    c = make_module(K=2, decoder="logp")
    c.add_classes(3)
    assert c.counts.shape[-1] == 5 and c.value_table is None


@pytest.mark.parametrize("decoder", ["sgd", "logp"])
def test_rollback_restores_classes_counts_and_values(decoder):
    m = make_module(C=8, M=16, K=2, top_k=2, decoder=decoder)
    gen = torch.Generator().manual_seed(5)
    idx = m.lookup(m.project(torch.randn(40, m.n_features, generator=gen)))
    y = torch.randint(0, 2, (40,), generator=gen)
    kw = dict(decoder=decoder, epochs=3, lr=0.3, label_smoothing=0.1, batch_size=16, grad_clip=1.0, dropout=0.0,
              shuffle=True)  # fmt: skip
    m.learn(idx, y, np.ones(40), rng=np.random.RandomState(0), **kw)
    before = {k: np.array(v) for k, v in m.arrays().items()}
    m.begin()
    m.add_classes(40)  # a new value block / a larger count capacity
    m.learn(idx, y + 30, np.ones(40), rng=np.random.RandomState(1), **kw)
    m.rollback()
    assert m.n_classes == 2
    after = m.arrays()
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    m.begin()
    m.add_classes(1)
    m.commit()
    assert m.n_classes == 3


def test_random_projection_columns_are_unit_norm():
    m = make_module(D=11, C=5, d=4)
    torch.testing.assert_close(m.projection.norm(dim=0), torch.ones(20))


def test_chunk_projection_splits_input():
    m = DiscreteKeyValueBottleneck(6, 3, 4, 2, projection="chunk")
    z = torch.arange(12.0).view(2, 6)
    assert torch.equal(m.project(z)[1, 2], torch.tensor([10.0, 11.0]))
    with pytest.raises(ValueError, match="n_heads \\* key_dim"):
        DiscreteKeyValueBottleneck(7, 3, 4, 2, projection="chunk")


def test_pruning_masks_unused_keys_and_keeps_empty_heads_searchable():
    m = make_module(C=2, M=8, decoder="logp")
    counts = torch.zeros(2, 8, 3, dtype=torch.float64)
    counts[0, 3, 0] = 1.0
    m.counts = counts
    bias = m.search_bias(prune=True)
    assert torch.isinf(bias[0]).sum() == 7 and torch.isfinite(bias[0, 3])
    assert torch.isfinite(bias[1]).all()  # head 1 has no trained key yet
    idx = m.lookup(m.project(torch.randn(20, m.n_features)), prune=True)
    assert (idx[:, 0] == 3).all()


@pytest.mark.parametrize("decoder", ["sgd", "logp"])
@pytest.mark.parametrize("values_dtype", ["float32", "bfloat16"])
def test_state_round_trip(decoder, values_dtype):
    gen = torch.Generator().manual_seed(0)
    m = DiscreteKeyValueBottleneck(7, 4, 16, 3, n_classes=3, decoder=decoder, values_dtype=values_dtype)
    m.set_keys(torch.randn(4, 16, 3, generator=gen))
    idx = m.lookup(m.project(torch.randn(30, 7, generator=gen)))
    m.learn(idx, torch.randint(0, 3, (30,), generator=gen), np.ones(30), decoder=decoder, epochs=2,
            rng=np.random.RandomState(0), lr=0.3, label_smoothing=0.0, batch_size=8, grad_clip=None,
            dropout=0.0, shuffle=True)  # fmt: skip
    m.add_classes(2)
    clone = DiscreteKeyValueBottleneck.from_state(m.config(), m.arrays())
    for k, v in m.arrays().items():
        np.testing.assert_array_equal(clone.arrays()[k], v)
    z = torch.randn(5, m.n_features)
    assert torch.equal(clone(z), m(z))
    assert clone.config() == m.config()


def test_state_of_earlier_versions_loads():
    """Dense (C, M, K) values and counts, no decoder in the config (pickles and files of format 2)."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 3, (4, 16, 3), generator=gen).double()
    values = torch.randn(4, 16, 3, generator=gen)
    ref = DiscreteKeyValueBottleneck(7, 4, 16, 3, n_classes=0, decoder="logp")
    old = {"projection": ref.projection, "keys": torch.randn(4, 16, 3, generator=gen), "values": values,
           "counts": counts}  # fmt: skip
    cfg = {k: v for k, v in ref.config().items() if k not in ("table", "decoder")}
    cfg["n_classes"] = 3
    logp = DiscreteKeyValueBottleneck.from_state(cfg, old)
    assert torch.equal(logp.counts, counts)
    sgd = DiscreteKeyValueBottleneck.from_state(dict(cfg, decoder="sgd"), old)
    assert torch.equal(sgd.values, values) and torch.equal(sgd.usage, counts.sum(-1))


def test_clip_bound_skips_sorting_only_when_clipping_is_impossible():
    m = make_module(C=256, M=8)
    w = torch.ones(64)
    assert m._clip_cannot_trigger(w, None, 1.0, 256)  # bound sqrt(2/256) = 0.09
    assert not m._clip_cannot_trigger(w, None, 0.01, 256)
    assert not m._clip_cannot_trigger(w * 100, None, 1.0, 256)
    assert not make_module(C=1)._clip_cannot_trigger(w, None, 1.0, 1)  # bound sqrt(2) > 1


@pytest.mark.parametrize("dropout", [False, True])
def test_native_and_torch_scatter_agree(monkeypatch, dropout):
    from skdkvb import _native

    if _native.scatter_fn() is None:
        pytest.skip(f"native kernels unavailable: {_native.state.get('error')}")
    results = []
    for native in ("1", "0"):
        monkeypatch.setenv("SKDKVB_NATIVE", native)
        m = make_module(C=64, M=32, top_k=2, seed=3)
        gen = torch.Generator().manual_seed(4)
        idx = m.lookup(m.project(torch.randn(50, m.n_features, generator=gen)))
        y = torch.randint(0, m.n_classes, (50,), generator=gen)
        mask = (torch.rand(50, 128, generator=gen) < 0.8).float() / 0.8 if dropout else None
        before = m.values.detach().clone()
        m.sgd_step(idx, y, torch.ones(50), lr=0.3, head_mask=mask)
        results.append(m.values.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
    untouched = (results[1] == before).all(-1)
    assert torch.equal((results[0] == before).all(-1), untouched)


def test_count_decoders_score_in_float32_with_half_precision_values():
    m = DiscreteKeyValueBottleneck(7, 64, 16, 3, n_classes=3, values_dtype="bfloat16", decoder="logp")
    m.counts = torch.randint(0, 50, (64, 16, 3)).double()
    idx = m.lookup(m.project(torch.randn(9, 7)))
    for decoder in ("vote", "logp"):
        scores = m.decode(idx, decoder)
        assert scores.dtype == torch.float32
        counts = m.counts.view(-1, 3)[m.flat_index(idx)]
        freq = (counts + 0.1) / (counts.sum(-1, keepdim=True) + 0.3)
        expected = freq.mean(1) if decoder == "vote" else freq.log().sum(1)
        torch.testing.assert_close(scores, expected.float())


def test_search_bias_follows_new_keys_and_usage():
    m = make_module(C=2, M=8, decoder="logp")
    first = m.search_bias(prune=False).clone()
    keys = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(9))
    m.set_keys(keys)
    torch.testing.assert_close(m.search_bias(prune=False), keys.pow(2).sum(-1))
    assert not torch.equal(m.search_bias(prune=False), first)
    m.add_counts(torch.tensor([[[3], [5]]]), torch.tensor([1]), torch.ones(1))
    bias = m.search_bias(prune=True)
    assert torch.isfinite(bias[0, 3]) and torch.isinf(bias).sum() == 14
