"""Tests of the growing count and value tables: dense, sparse and log-structured layouts agree, growth,
truncation, atomicity (an exception injected at every line), state and pickling without a second copy."""

import contextlib
import io
import itertools
import pickle
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skdkvb import _tables
from skdkvb._tables import CountTable, ValueTable

N_ROWS, S = 12, 3

# one operation: ("grow", n_new), ("compact", 0) or ("add", list of (row tuple, class index, weight))
op = st.one_of(
    st.tuples(st.just("grow"), st.integers(0, 4)),
    st.tuples(st.just("compact"), st.just(0)),
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


def _batch(arg, n_classes):
    rows = torch.tensor([r for r, _, _ in arg], dtype=torch.int64).reshape(-1, S)
    y = torch.tensor([c % n_classes for _, c, _ in arg], dtype=torch.int64)
    w = torch.tensor([w for _, _, w in arg], dtype=torch.float64)
    return rows, y, w


def _apply(tables, ops):
    for kind, arg in ops:
        if kind == "grow":
            for t in tables:
                t.add_classes(arg)
        elif kind == "compact":
            tables[-1].compact()  # only the last table: compaction must not change any number
        elif tables[0].n_classes and arg:
            rows, y, w = _batch(arg, tables[0].n_classes)
            for t in tables:
                t.add(rows, y, w)


def _reference_scores(dense, usage, rows, decoder, a):
    k = dense.shape[1]
    f = (dense[rows] + a) / (usage[rows].unsqueeze(-1) + k * a)
    return f.log().sum(1) if decoder == "logp" else f.mean(1)


@contextlib.contextmanager
def _torch_scoring():
    """Run the torch code (the one other devices use) instead of the numpy CPU path."""
    old = _tables._NUMPY_ON_CPU
    _tables._NUMPY_ON_CPU = False
    try:
        yield
    finally:
        _tables._NUMPY_ON_CPU = old


def _snapshot(t):
    return (t.n_classes, t.layout, t.to_dense(), t.usage().clone())


def _assert_same(t, snap):
    n_classes, layout, dense, usage = snap
    assert t.n_classes == n_classes and t.layout == layout
    assert torch.equal(t.to_dense(), dense) and torch.equal(t.usage(), usage)
    t.check()


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=10), initial=st.integers(1, 3))
def test_layouts_agree_and_match_reference(ops, initial):
    dense = CountTable(N_ROWS, initial, layout="dense")
    sparse = CountTable(N_ROWS, initial, layout="sparse")
    auto = CountTable(N_ROWS, initial, dense_max_cells=N_ROWS * 9)  # switches to sparse past 9 columns
    lsm = CountTable(N_ROWS, initial, layout="sparse")  # compacted at random points
    _apply([dense, sparse, auto, lsm], ops)
    ref = dense.to_dense()
    for t in (sparse, auto, lsm):
        t.check()
        assert t.n_classes == dense.n_classes
        torch.testing.assert_close(t.to_dense(), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(t.usage(), dense.usage(), rtol=0, atol=0)
    torch.testing.assert_close(ref.sum(1), dense.usage(), rtol=1e-12, atol=1e-12)
    rows = torch.tensor([[0, 1, 2], [3, 3, 11], [5, 7, 9]], dtype=torch.int64)
    for decoder in ("vote", "logp"):
        expected = _reference_scores(ref, dense.usage(), rows, decoder, 0.1).float()
        for t in (dense, sparse, auto, lsm):
            got = t.scores(rows, decoder, 0.1)
            assert got.dtype == torch.float32 and got.shape == (3, dense.n_classes)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            with _torch_scoring():
                torch.testing.assert_close(t.scores(rows, decoder, 0.1), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=10), more=st.lists(op, max_size=4))
def test_torch_path_matches_numpy_path(ops, more):
    # the torch code (GPU and other devices) run on the CPU against the numpy CPU path
    tables = {}
    for mode in ("numpy", "torch"):
        with _torch_scoring() if mode == "torch" else contextlib.nullcontext():
            t = CountTable(N_ROWS, 2, layout="sparse")
            d = CountTable(N_ROWS, 2, dense_max_cells=N_ROWS * 5)
            _apply([d, t], ops)
            t.scores(torch.tensor([[0, 1, 2]]), "logp", 0.1)  # corrections, then kept through merges
            _apply([d, t], more)
            rows = torch.tensor([[0, 1, 2], [3, 3, 11], [5, 7, 9]], dtype=torch.int64)
            tables[mode] = [
                (x.to_dense(), x.usage().clone(), x.scores(rows, "logp", 0.1), x.scores(rows, "vote", 0.1))
                for x in (t, d)
            ]
    for a, b in zip(tables["numpy"], tables["torch"]):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-12)
        torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a[3], b[3], rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    cells=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6), st.integers(1, 4)), min_size=1, max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=8),
    perm_seed=st.integers(0, 2**16),
)
def test_merge_order_invariance_integer_weights(cells, cuts, perm_seed):
    # the same multiset of integer-weighted updates, in any order and any batching, gives
    # bit-identical counts in the dense layout, in one sparse add and in the LSM store
    def table(layout, batches):
        t = CountTable(41, 7, layout=layout)
        for b in batches:
            if b:
                r = torch.tensor([[c[0]] for c in b])
                t.add(r, torch.tensor([c[1] for c in b]), torch.tensor([float(c[2]) for c in b]))
        return t

    bounds = sorted({0, len(cells), *(min(c, len(cells)) for c in cuts)})
    batches = [cells[i:j] for i, j in itertools.pairwise(bounds)]
    order = np.random.default_rng(perm_seed).permutation(len(cells))
    shuffled = [cells[i] for i in order]
    sequential = table("dense", [[c] for c in cells])
    expected = sequential.to_dense()
    for t in (table("sparse", [cells]), table("sparse", batches), table("sparse", [[c] for c in shuffled])):
        assert torch.equal(t.to_dense(), expected)
        assert torch.equal(t.usage(), sequential.usage())
        t.compact()
        assert torch.equal(t.to_dense(), expected) and t.n_runs == 1
    assert torch.equal(table("dense", batches).to_dense(), expected)


def test_lsm_runs_stay_logarithmic_and_reads_compact(monkeypatch):
    t = CountTable(1000, 4, layout="sparse")
    gen = torch.Generator().manual_seed(0)
    n_adds, copied = 64, []
    merge = _tables._merge_sorted

    def counting(a_codes, a_vals, b_codes, b_vals, n_add):
        copied.append(a_codes.numel() + b_codes.numel())
        return merge(a_codes, a_vals, b_codes, b_vals, n_add)

    monkeypatch.setattr(_tables, "_merge_sorted", counting)
    for _ in range(n_adds):
        rows = torch.randint(0, 1000, (20, 2), generator=gen)
        t.add(rows, torch.randint(0, 4, (20,), generator=gen), torch.ones(20, dtype=torch.float64))
        assert t.n_runs <= int(np.log2(n_adds)) + 1
    # amortised O(batch * log): every cell is copied at most log2(n_adds) + 1 times by the merges
    assert sum(copied) <= n_adds * 40 * (int(np.log2(n_adds)) + 1)
    monkeypatch.undo()
    dense = t.to_dense()
    q = torch.randint(0, 1000, (5, 2), generator=gen)
    before = t.scores(q, "logp", 0.5)
    t.scores(torch.randint(0, 1000, (2000, 2), generator=gen), "logp", 0.5)  # reads >= stored cells
    assert t.n_runs == 1  # compacted, amortised by the reads
    assert torch.equal(t.to_dense(), dense)
    torch.testing.assert_close(t.scores(q, "logp", 0.5), before, rtol=1e-6, atol=1e-6)


def test_logp_correction_survives_class_growth():
    # the logp correction does not depend on K: after add_classes the scores match the reference
    t = CountTable(6, 3, layout="sparse")
    t.add(torch.tensor([[0, 1], [2, 1]]), torch.tensor([0, 2]), torch.tensor([1.0, 3.0]))
    rows = torch.tensor([[0, 1], [2, 5]])
    t.scores(rows, "logp", 0.1)
    t.add_classes(5)
    t.add(torch.tensor([[1, 5]]), torch.tensor([6]), torch.tensor([2.0]))
    for decoder in ("logp", "vote"):
        ref = _reference_scores(t.to_dense(), t.usage(), rows, decoder, 0.1).float()
        torch.testing.assert_close(t.scores(rows, decoder, 0.1), ref, rtol=1e-5, atol=1e-5)


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


# ----------------------------------------------------------------------------- exception safety
class _Injected(BaseException):
    """Stands for a KeyboardInterrupt (a BaseException) raised between two statements."""


def _interrupt_at(n):
    """A tracer raising _Injected at the n-th line executed inside skdkvb/_tables.py."""
    count = [0]

    def local(frame, event, arg):
        if event == "line":
            count[0] += 1
            if count[0] == n:
                raise _Injected
        return local

    def global_(frame, event, arg):
        return local if frame.f_code.co_filename == _tables.__file__ else None

    return global_


def _every_line(make, action, check=_assert_same):
    """Run ``action`` on fresh tables, interrupted at line 1, 2, ... until it completes; each
    interrupted call must leave the table exactly as before."""
    for n in itertools.count(1):
        t = make()
        snap = _snapshot(t)
        old = sys.gettrace()
        sys.settrace(_interrupt_at(n))
        try:
            action(t)
        except _Injected:
            sys.settrace(old)
            check(t, snap)
            continue
        finally:
            sys.settrace(old)
        return n  # completed: every earlier line was an interruption point


def _filled(layout, n_classes=3, n_rows=10, **kw):
    def make():
        t = CountTable(n_rows, n_classes, layout=layout, **kw)
        t.add(torch.tensor([[0, 1], [2, 3], [2, 9]]), torch.tensor([0, 2, 1]), torch.tensor([1.0, 2.0, 0.5]))
        t.add(torch.tensor([[4, 1]]), torch.tensor([2]), torch.tensor([3.0]))
        return t

    return make


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize(
    "action",
    [
        pytest.param(lambda t: t.add(torch.tensor([[5, 6], [0, 1]]), torch.tensor([1, 0]), torch.ones(2)), id="add"),
        pytest.param(lambda t: t.add(torch.tensor([[0, 1]]), torch.tensor([0]), torch.ones(1)), id="add-existing"),
        pytest.param(lambda t: t.add_classes(40), id="add_classes"),
        pytest.param(lambda t: t.add_classes(1), id="add_classes-small"),
        pytest.param(lambda t: t.add_table(_filled("sparse")(), [2, 0, 1]), id="add_table"),
        pytest.param(lambda t: t.compact(), id="compact"),
        pytest.param(lambda t: t.restore(t.snapshot()), id="restore"),
        pytest.param(lambda t: t.truncate_classes(3), id="truncate_classes"),
        pytest.param(lambda t: t.scores(torch.tensor([[0, 1], [2, 2]]), "logp", 0.1), id="scores"),
    ],
)
def test_interrupted_anywhere_leaves_table_unchanged(layout, action):
    n = _every_line(_filled(layout, dense_max_cells=10 * 12) if layout == "dense" else _filled(layout), action)
    assert n > 1


def test_interrupted_auto_switch_and_truncate_leave_table_unchanged():
    make = _filled("auto", dense_max_cells=10 * 12)  # add_classes(20) switches to sparse
    _every_line(make, lambda t: t.add_classes(20))

    def grown():
        t = make()
        t.add_classes(20)
        assert t.layout == "sparse"
        return t

    _every_line(grown, lambda t: t.truncate_classes(3))


# ------------------------------------------------------------------------------- truncation
@pytest.mark.parametrize("layout", ["dense", "sparse", "auto"])
def test_truncate_undoes_growth_bit_for_bit(layout):
    t = _filled(layout, dense_max_cells=10 * 12)()
    before, usage, cap = t.to_dense(), t.usage().clone(), t.capacity
    t.add_classes(30)  # auto: switches to sparse
    assert t.layout == ("dense" if layout == "dense" else "sparse")
    t.truncate_classes(3)
    assert t.n_classes == 3 and t.layout == ("sparse" if layout == "sparse" else "dense")
    if layout == "auto":
        assert t.capacity == cap  # the former dense capacity
    assert torch.equal(t.to_dense(), before) and torch.equal(t.usage(), usage)
    t.check()
    t.add(torch.tensor([[0, 0]]), torch.tensor([2]), torch.tensor([1.0]))
    t.check()


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_truncate_refuses_columns_with_counts(layout):
    t = _filled(layout)()
    t.add_classes(2)
    t.add(torch.tensor([[0, 0]]), torch.tensor([4]), torch.tensor([1.0]))
    snap = _snapshot(t)
    with pytest.raises(ValueError, match="hold counts"):
        t.truncate_classes(3)
    with pytest.raises(ValueError, match="n_classes"):
        t.truncate_classes(9)
    _assert_same(t, snap)
    t.truncate_classes(5)  # nothing to drop
    _assert_same(t, snap)


# ------------------------------------------------------------------------------ bad input
def test_bad_input_leaves_table_unchanged():
    t = CountTable(4, 2, layout="sparse")
    t.add(torch.tensor([[0, 1]]), torch.tensor([1]), torch.tensor([1.0]))
    snap = _snapshot(t)
    for rows, y, w in [
        ([[0, 4]], [0], [1.0]),
        ([[0, 1]], [2], [1.0]),
        ([[0, 1]], [0], [-1.0]),
        ([[0, 1]], [0], [np.nan]),
    ]:
        with pytest.raises(ValueError):
            t.add(torch.tensor(rows), torch.tensor(y), torch.tensor(w))
    with pytest.raises(ValueError):
        t.add_classes(-1)
    for bad in ([[0, 4]], [[-1, 0]], [0, 1]):
        with pytest.raises(ValueError, match="rows"):
            t.scores(torch.tensor(bad), "logp", 0.1)
    with pytest.raises(ValueError, match="decoder"):
        t.scores(torch.tensor([[0, 1]]), "sgd", 0.1)
    with pytest.raises(ValueError, match="smoothing"):
        t.scores(torch.tensor([[0, 1]]), "logp", 0.0)
    _assert_same(t, snap)


# ------------------------------------------------------------------------- state and pickle
@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_state_dict_round_trip_exact(layout):
    t = CountTable(7, 4, layout=layout)
    t.add(torch.tensor([[0, 6], [3, 3]]), torch.tensor([3, 1]), torch.tensor([0.3, 1.7]))
    t.add(torch.tensor([[1, 6]]), torch.tensor([0]), torch.tensor([2.0]))
    state = t.state_dict()
    u = CountTable.from_state_dict(state)
    assert u.layout == layout and u.n_classes == 4
    assert torch.equal(u.to_dense(), t.to_dense()) and torch.equal(u.usage(), t.usage())
    u.add(torch.tensor([[1, 1]]), torch.tensor([0]), torch.tensor([1.0]))  # from_state_dict copies
    assert not torch.equal(u.to_dense(), t.to_dense())
    c = t.copy()
    c.add(torch.tensor([[1, 1]]), torch.tensor([0]), torch.tensor([1.0]))
    assert not torch.equal(c.to_dense(), t.to_dense())
    data = [k for k in state if k in ("buffer", "usage") or k.startswith(("codes_", "values_"))]
    assert data
    for name in data:  # views of the live tensors, no copy
        assert not state[name].flags.owndata, name


def test_state_dict_older_format():
    t = CountTable(5, 3, layout="dense")
    t.add(torch.tensor([[0, 4]]), torch.tensor([2]), torch.tensor([1.5]))
    old = {"layout": np.array("dense"), "auto": np.array(False), "dense_max_cells": np.array(2**24)}
    old |= {"shape": np.array([5, 3]), "usage": t.usage().numpy().copy(), "dense": t.to_dense().numpy()}
    assert torch.equal(CountTable.from_state_dict(old).to_dense(), t.to_dense())
    r, c, v = t._cells()
    old |= {"layout": np.array("sparse"), "codes": ((r << 32) | c).numpy(), "values": v.numpy()}
    assert torch.equal(CountTable.from_state_dict(old).to_dense(), t.to_dense())


class _Sink:
    """A file that keeps nothing (only counts bytes)."""

    n = 0

    def write(self, b):
        m = memoryview(b)
        self.n += m.nbytes
        return m.nbytes


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_pickle_round_trip_and_no_second_copy(layout):
    t = CountTable(200_000, 8, layout=layout)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        rows = torch.randint(0, 200_000, (20_000, 4), generator=gen)
        w = torch.rand(20_000, dtype=torch.float64, generator=gen)
        t.add(rows, torch.randint(0, 8, (20_000,), generator=gen), w)
    for protocol in (2, 4, 5):
        u = pickle.loads(pickle.dumps(t, protocol=protocol))
        assert torch.equal(u.to_dense(), t.to_dense()) and torch.equal(u.usage(), t.usage()) and u.n_runs == t.n_runs
        u.add(torch.tensor([[0, 1]]), torch.tensor([7]), torch.tensor([1.0]))  # writable, independent
        u.check()
        assert not torch.equal(u.to_dense(), t.to_dense())
    tracemalloc.start()
    try:
        sink = _Sink()
        pickle.dump(t, sink, protocol=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    state_bytes = sum(a.nbytes for a in t.state_dict().values())
    assert sink.n >= state_bytes > 4e6
    assert peak < 0.05 * state_bytes  # streamed from the live tensors


def test_value_table_pickle_no_second_copy():
    v = ValueTable(100_000, 20)
    v.view()[:, :] = 0.25
    tracemalloc.start()
    try:
        pickle.dump(v, _Sink(), protocol=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.05 * v.nbytes()
    w = pickle.loads(pickle.dumps(v, protocol=5))
    assert torch.equal(w.view(), v.view()) and w.max_block_bytes == v.max_block_bytes
    w.view()[:, 0] = 1.0
    assert v.view()[0, 0] == 0.25


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_add_table_equals_direct_adds(layout):
    rows = torch.tensor([[0, 1], [2, 2], [5, 0]])
    y_other = torch.tensor([0, 1, 1])
    w = torch.tensor([1.0, 0.5, 2.0])
    other = CountTable(6, 2, layout="sparse")
    other.add(rows[:1], y_other[:1], w[:1])
    other.add(rows[1:], y_other[1:], w[1:])  # two runs
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
    t._s = t._s.replace(usage=t._s.usage + 1)
    with pytest.raises(ValueError, match="usage"):
        t.check()


def test_scores_split_into_pieces(monkeypatch):
    # tiny block bounds: several sample blocks and several gather pieces per run give the same scores
    t = CountTable(30, 5, layout="sparse")
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        t.add(torch.randint(0, 30, (40, 3), generator=gen), torch.randint(0, 5, (40,), generator=gen), torch.ones(40))
    rows = torch.randint(0, 30, (50, 3), generator=gen)
    expected = {d: _reference_scores(t.to_dense(), t.usage(), rows, d, 0.3).float() for d in ("vote", "logp")}
    monkeypatch.setattr(_tables, "_BLOCK_CELLS", 16)
    monkeypatch.setattr(_tables, "_QUERY_BLOCK", 12)
    for d, e in expected.items():
        torch.testing.assert_close(t.scores(rows, d, 0.3), e, rtol=1e-5, atol=1e-5)
        with _torch_scoring():
            torch.testing.assert_close(t.scores(rows, d, 0.3), e, rtol=1e-5, atol=1e-5)


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


def test_value_table_truncate():
    v = ValueTable(6, 40)
    v.view()[:, :] = 2.0
    v.add_classes(3)  # a second block
    assert len(v.blocks) == 2
    v.truncate_classes(40)
    assert len(v.blocks) == 1 and v.n_classes == 40 and torch.equal(v.view(), torch.full((6, 40), 2.0))
    v.truncate_classes(30)  # dropped columns become zero padding again
    assert v.blocks[0][:, 30:].count_nonzero() == 0 and v.n_classes == 30
    v.add_classes(10)
    assert v.view()[:, 30:].count_nonzero() == 0
    with pytest.raises(ValueError, match="n_classes"):
        v.truncate_classes(41)
    v.truncate_classes(0)
    assert v.blocks == [] and v.n_classes == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_value_table_half_round_trip(dtype):
    v = ValueTable(4, 3, dtype=dtype)
    v.view()[:, :] = torch.tensor(0.3).to(dtype)
    w = ValueTable.from_state_dict(v.state_dict())
    assert w.dtype == dtype and torch.equal(w.view(), v.view())
    w = pickle.loads(pickle.dumps(v))
    assert w.dtype == dtype and torch.equal(w.view(), v.view())
    old = {"shape": np.array([4, 3]), "dtype": np.array(str(dtype)), "block_0": v.blocks[0].float().numpy()}
    assert torch.equal(ValueTable.from_state_dict(old).view(), v.view())  # older format: float32 blocks


def test_scores_under_float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for layout in ("dense", "sparse"):
            t = CountTable(4, 3, layout=layout)
            t.add(torch.tensor([[0, 1]]), torch.tensor([2]), torch.tensor([1.0]))
            s = t.scores(torch.tensor([[0, 1], [2, 3]]), "logp", 0.1)
            assert s.dtype == torch.float32 and s.argmax(1)[0] == 2
            buf = io.BytesIO()
            pickle.dump(t, buf, protocol=5)
            assert torch.equal(pickle.loads(buf.getvalue()).to_dense(), t.to_dense())
    finally:
        torch.set_default_dtype(old)


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=6), more=st.lists(op, min_size=1, max_size=4), grow=st.integers(0, 30))
def test_laws_truncate_after_growth_and_restore_after_anything(ops, more, grow):
    for layout in ("dense", "sparse", "auto"):
        t = CountTable(N_ROWS, 2, layout=layout, dense_max_cells=N_ROWS * 9)
        _apply([t], ops)
        snap, state = _snapshot(t), {k: v.copy() for k, v in t.state_dict().items()}  # views: copy to keep
        layout_before = t.layout
        t.add_classes(grow)  # truncate_classes(n) . add_classes(m) == identity (layout included)
        t.truncate_classes(snap[0])
        _assert_same(t, snap)
        assert t.layout == layout_before
        token = t.snapshot()  # restore(snapshot) == identity, whatever happened in between
        _apply([t], more)
        t.restore(token)
        _assert_same(t, snap)
        u = CountTable.from_state_dict(state)
        assert torch.equal(u.to_dense(), snap[2])
    with pytest.raises(ValueError, match="snapshot"):
        t.restore(CountTable(N_ROWS, 2).snapshot())


@pytest.mark.parametrize("layout", ["dense", "auto"])
def test_snapshot_nesting_release_and_growth(layout):
    t = _filled(layout, dense_max_cells=10 * 12)()
    outer_snap = _snapshot(t)
    outer = t.snapshot()
    t.add(torch.tensor([[0, 1]]), torch.tensor([1]), torch.tensor([2.0]))
    inner_snap = _snapshot(t)
    inner = t.snapshot()
    t.add(torch.tensor([[0, 9]]), torch.tensor([2]), torch.tensor([1.5]))
    t.add_classes(40)  # dense: a new buffer; auto: switches to sparse
    t.add(torch.tensor([[3, 3]]), torch.tensor([41]), torch.tensor([1.0]))
    t.restore(inner)
    _assert_same(t, inner_snap)
    with pytest.raises(ValueError, match="snapshot"):
        t.restore(inner)  # a token is used once
    t.add(torch.tensor([[5, 5]]), torch.tensor([0]), torch.tensor([4.0]))
    t.restore(outer)
    _assert_same(t, outer_snap)
    assert t._journals == []
    token = t.snapshot()
    t.add(torch.tensor([[5, 5]]), torch.tensor([0]), torch.tensor([4.0]))
    kept = _snapshot(t)
    t.release(token)  # keep the update, stop recording
    assert t._journals == []
    t.add(torch.tensor([[6, 6]]), torch.tensor([0]), torch.tensor([1.0]))
    assert t.to_dense()[5, 0] == kept[2][5, 0]
    with pytest.raises(ValueError, match="snapshot"):
        t.release(token)
    assert CountTable.from_state_dict(t.state_dict())._journals == []


def test_scores_from_several_threads():
    # reads fill caches and may compact the store; concurrent reads must still agree with serial ones
    from concurrent.futures import ThreadPoolExecutor

    t = CountTable(500, 6, layout="sparse")
    gen = torch.Generator().manual_seed(7)
    for _ in range(9):
        t.add(torch.randint(0, 500, (30, 3), generator=gen), torch.randint(0, 6, (30,), generator=gen), torch.ones(30))
    queries = [torch.randint(0, 500, (120, 3), generator=gen) for _ in range(8)]
    expected = [_reference_scores(t.to_dense(), t.usage(), q, "logp", 0.2).float() for q in queries]
    assert t.n_runs > 1
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda q: t.scores(q, "logp", 0.2), queries * 3))
    for g, e in zip(got, expected * 3):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    t.check()


@pytest.mark.parametrize("layout", ["auto", "dense", "sparse"])
def test_empty_like_and_cells(layout):
    """empty_like keeps the shape and layout rule but no counts; cells lists every nonzero cell once."""
    table = CountTable(32, 3, layout=layout, dense_max_cells=64)
    rng = np.random.default_rng(0)
    for _ in range(3):  # several runs in the sparse store, with repeated cells
        rows, y = rng.integers(0, 32, (6, 2)), rng.integers(0, 3, 6)
        table.add(torch.as_tensor(rows), torch.as_tensor(y), torch.ones(6, dtype=torch.float64))
    empty = table.empty_like()
    assert (empty.n_rows, empty.n_classes, empty.dense_max_cells) == (32, 3, 64)
    assert empty.layout == table.layout and float(empty.to_dense().abs().sum()) == 0.0
    empty.add_classes(10)  # the layout rule is kept: "auto" switches to sparse past 64 cells
    assert empty.layout == ("sparse" if layout != "dense" else "dense")
    r, c, v = table.cells()
    dense = table.to_dense()
    assert len(set(zip(r.tolist(), c.tolist()))) == len(r) == int((dense != 0).sum())
    assert torch.equal(dense[r, c], v)
