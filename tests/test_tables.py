"""Tests of the growing count and value tables: dense and sparse layouts agree, growth, atomicity, state."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skdkvb import _tables
from skdkvb._tables import CountTable, ValueTable

N_ROWS, S = 12, 3

# one operation: ("grow", n_new) or ("add", list of (row tuple, class index, weight))
op = st.one_of(
    st.tuples(st.just("grow"), st.integers(0, 4)),
    st.tuples(
        st.just("add"),
        st.lists(
            st.tuples(
                st.lists(st.integers(0, N_ROWS - 1), min_size=S, max_size=S),
                st.integers(0, 1000),
                st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.25]),
            ),
            min_size=0,
            max_size=6,
        ),
    ),
)


def _apply(tables, ops):
    for kind, arg in ops:
        if kind == "grow":
            for t in tables:
                t.add_classes(arg)
        elif tables[0].n_classes and arg:
            rows = torch.tensor([r for r, _, _ in arg], dtype=torch.int64)
            y = torch.tensor([c % tables[0].n_classes for _, c, _ in arg], dtype=torch.int64)
            w = torch.tensor([w for _, _, w in arg], dtype=torch.float64)
            for t in tables:
                t.add(rows, y, w)


def _reference_scores(dense, usage, rows, decoder, a):
    k = dense.shape[1]
    f = (dense[rows] + a) / (usage[rows].unsqueeze(-1) + k * a)
    return f.log().sum(1) if decoder == "logp" else f.mean(1)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=8), initial=st.integers(1, 3))
def test_layouts_agree_and_match_reference(ops, initial):
    dense = CountTable(N_ROWS, initial, layout="dense")
    sparse = CountTable(N_ROWS, initial, layout="sparse")
    auto = CountTable(N_ROWS, initial, dense_max_cells=N_ROWS * 9)  # switches to sparse past 9 columns
    _apply([dense, sparse, auto], ops)
    ref = dense.to_dense()
    for t in (sparse, auto):
        t.check()
        assert t.n_classes == dense.n_classes
        torch.testing.assert_close(t.to_dense(), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(t.usage(), dense.usage(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref.sum(1), dense.usage(), rtol=1e-12, atol=1e-12)
    rows = torch.tensor([[0, 1, 2], [3, 3, 11], [5, 7, 9]], dtype=torch.int64)
    for decoder in ("vote", "logp"):
        expected = _reference_scores(ref, dense.usage(), rows, decoder, 0.1).float()
        for t in (dense, sparse, auto):
            got = t.scores(rows, decoder, 0.1)
            assert got.dtype == torch.float32 and got.shape == (3, dense.n_classes)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_untouched_cells_stay_zero_and_auto_switch():
    t = CountTable(6, 2, dense_max_cells=6 * 8)
    t.add(torch.tensor([[1, 4]]), torch.tensor([1]), torch.tensor([2.0]))
    assert t.layout == "dense"
    before = t.to_dense()
    t.add_classes(20)
    assert t.layout == "sparse"
    d = t.to_dense()
    assert torch.equal(d[:, :2], before)  # growth keeps counts bit-identical
    assert d.count_nonzero() == 2 and d[1, 1] == 2.0 and d[4, 1] == 2.0
    assert t.nnz == 2


def test_dense_growth_keeps_counts_bit_identical():
    t = CountTable(5, 3, layout="dense")
    t.add(torch.tensor([[0, 2], [4, 4]]), torch.tensor([2, 0]), torch.tensor([0.1, 0.7]))
    before = t.to_dense()
    for _ in range(10):
        t.add_classes(3)
        assert torch.equal(t.to_dense()[:, :3], before)
    assert t.to_dense()[:, 3:].count_nonzero() == 0


@pytest.mark.parametrize("layout", ["dense", "sparse", "sparse-existing-cells"])
def test_interrupted_add_leaves_table_unchanged(layout, monkeypatch):
    existing = layout == "sparse-existing-cells"
    layout = layout.split("-")[0]
    t = CountTable(8, 3, layout=layout)
    t.add(torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 2]), torch.tensor([1.0, 2.0]))
    state = {k: v.copy() for k, v in t.state_dict().items()}

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    if layout == "sparse" and not existing:
        monkeypatch.setattr(CountTable, "_merge", staticmethod(boom))
    else:
        monkeypatch.setattr(_tables.torch.Tensor, "index_add_", boom)
    with pytest.raises(KeyboardInterrupt):
        if existing:  # only cells already stored: the in-place path
            t.add(torch.tensor([[0, 1]]), torch.tensor([0]), torch.tensor([4.0]))
        else:
            t.add(torch.tensor([[5, 6]]), torch.tensor([1]), torch.tensor([4.0]))
    monkeypatch.undo()
    after = t.state_dict()
    for k, v in state.items():
        np.testing.assert_array_equal(after[k], v)
    t.check()


def test_bad_input_leaves_table_unchanged():
    t = CountTable(4, 2, layout="sparse")
    t.add(torch.tensor([[0, 1]]), torch.tensor([1]), torch.tensor([1.0]))
    before = t.to_dense()
    for rows, y, w in [
        ([[0, 4]], [0], [1.0]),
        ([[0, 1]], [2], [1.0]),
        ([[0, 1]], [0], [-1.0]),
        ([[0, 1]], [0], [np.nan]),
    ]:
        with pytest.raises(ValueError):
            t.add(torch.tensor(rows), torch.tensor(y), torch.tensor(w))
    assert torch.equal(t.to_dense(), before)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_state_dict_round_trip_exact(layout):
    t = CountTable(7, 4, layout=layout)
    t.add(torch.tensor([[0, 6], [3, 3]]), torch.tensor([3, 1]), torch.tensor([0.3, 1.7]))
    u = CountTable.from_state_dict(t.state_dict())
    assert u.layout == layout and u.n_classes == 4
    assert torch.equal(u.to_dense(), t.to_dense()) and torch.equal(u.usage(), t.usage())
    c = t.copy()
    c.add(torch.tensor([[1, 1]]), torch.tensor([0]), torch.tensor([1.0]))
    assert not torch.equal(c.to_dense(), t.to_dense())


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_add_table_equals_direct_adds(layout):
    rows = torch.tensor([[0, 1], [2, 2], [5, 0]])
    y_other = torch.tensor([0, 1, 1])
    w = torch.tensor([1.0, 0.5, 2.0])
    other = CountTable(6, 2, layout="sparse")
    other.add(rows, y_other, w)
    columns = torch.tensor([3, 1])
    merged = CountTable(6, 4, layout=layout)
    merged.add(torch.tensor([[4, 4]]), torch.tensor([2]), torch.tensor([1.0]))
    direct = merged.copy()
    merged.add_table(other, columns)
    direct.add(rows, columns[y_other], w)
    torch.testing.assert_close(merged.to_dense(), direct.to_dense(), rtol=0, atol=1e-15)
    torch.testing.assert_close(merged.usage(), direct.usage(), rtol=0, atol=1e-15)


def test_check_detects_broken_usage():
    t = CountTable(3, 2, layout="sparse")
    t.add(torch.tensor([[0]]), torch.tensor([1]), torch.tensor([1.0]))
    t._usage = t._usage + 1
    with pytest.raises(ValueError, match="usage"):
        t.check()


def test_value_table_blocks_growth():
    v = ValueTable(10, 0)
    assert v.nbytes() == 0  # lazy
    v.add_classes(40)
    v.view()[:, :] = 1.0
    first = v.blocks[0]
    v.add_classes(1)
    assert v.blocks[0] is first  # existing columns are never copied
    assert v.blocks[1].shape[1] == 16  # max(16, 40 // 4)
    assert torch.equal(v.view()[:, :40], torch.ones(10, 40))
    assert v.view()[:, 40:].count_nonzero() == 0
    for _ in range(200):
        v.add_classes(1)
    assert v.capacity <= 1.25 * v.n_classes + 16
    for _, _, b in v.segments():
        assert b.is_contiguous()
    w = ValueTable.from_state_dict(v.state_dict())
    assert torch.equal(w.view(), v.view()) and w.n_classes == v.n_classes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_value_table_half_round_trip(dtype):
    v = ValueTable(4, 3, dtype=dtype)
    v.view()[:, :] = torch.tensor(0.3).to(dtype)
    w = ValueTable.from_state_dict(v.state_dict())
    assert w.dtype == dtype and torch.equal(w.view(), v.view())


def test_scores_under_float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        t = CountTable(4, 3, layout="sparse")
        t.add(torch.tensor([[0, 1]]), torch.tensor([2]), torch.tensor([1.0]))
        s = t.scores(torch.tensor([[0, 1], [2, 3]]), "logp", 0.1)
        assert s.dtype == torch.float32 and s.argmax(1)[0] == 2
    finally:
        torch.set_default_dtype(old)


def test_sparse_scores_fallback_without_csr_products(monkeypatch):
    t = CountTable(9, 4, layout="sparse")
    t.add(torch.tensor([[0, 3], [3, 8], [0, 0]]), torch.tensor([1, 3, 2]), torch.tensor([1.0, 2.0, 0.5]))
    rows = torch.tensor([[0, 3], [8, 5], [0, 0]])
    expected = {d: t.scores(rows, d, 0.2) for d in ("vote", "logp")}

    def missing(*args, **kwargs):
        raise NotImplementedError

    monkeypatch.setattr(_tables.torch, "sparse_csr_tensor", missing)
    for d, e in expected.items():
        torch.testing.assert_close(t.scores(rows, d, 0.2), e, rtol=1e-6, atol=1e-6)
        ref = _reference_scores(t.to_dense(), t.usage(), rows, d, 0.2).float()
        torch.testing.assert_close(e, ref, rtol=1e-5, atol=1e-5)
