"""Correctness of the nearest-key search against a brute-force reference.

Integer-valued queries and keys keep every distance exact in float32 (all
products and sums are small integers), so both back-ends must agree with the
brute force *exactly*, ties included (lowest index wins, as ``torch.argmin``).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skdkvb import _native, _search
from skdkvb._search import block_size_for, key_scores_bias, nearest_keys, search_backend

BACKENDS = ["native", "torch"]


def brute_force(queries, keys, valid=None, top_k=1):
    """(n, C, top_k) by explicit float64 differences; ties to the lowest index."""
    diff = queries.double().unsqueeze(2) - keys.double().unsqueeze(0)  # (n, C, M, d)
    dist = diff.pow(2).sum(-1)
    if valid is not None:
        dist = dist.masked_fill(~valid.unsqueeze(0), float("inf"))
    # Stable sort: equal distances keep index order.
    return torch.sort(dist, dim=-1, stable=True).indices[..., :top_k]


def run(backend, queries, keys, bias=None, top_k=1, block_size=None):
    if backend == "torch":
        if bias is None:
            bias = key_scores_bias(keys)
        return _search._torch_search(queries, keys, bias, top_k, block_size)
    if search_backend(queries, top_k) != "native":
        pytest.skip(f"native kernel unavailable: {_native.state.get('error')}")
    return nearest_keys(queries, keys, bias, top_k=top_k, block_size=block_size)


def int_data(n, C, M, d, seed, low=-3, high=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(low, high, (n, C, d), generator=g).to(dtype)
    k = torch.randint(low, high, (C, M, d), generator=g).to(dtype)
    return q, k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n, C, M, d",
    [(1, 1, 1, 1), (7, 3, 5, 2), (37, 4, 50, 14), (26, 2, 64, 14), (64, 2, 33, 3), (19, 5, 16, 16), (200, 1, 300, 4)],
)
def test_matches_brute_force_exactly_with_ties(backend, n, C, M, d):
    # Few distinct integer values: many exact ties, resolved to the lowest index.
    q, k = int_data(n, C, M, d, seed=n * 31 + M)
    got = run(backend, q, k)
    assert got.shape == (n, C, 1) and got.dtype == torch.long
    assert torch.equal(got, brute_force(q, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pruned_keys_are_never_selected(backend):
    q, k = int_data(120, 3, 40, 4, seed=1)
    g = torch.Generator().manual_seed(2)
    valid = torch.rand(3, 40, generator=g) < 0.2
    valid[:, 0] = True
    # Make each pruned key the exact match of some query: pruning must still win.
    k[:, ~valid[0]] = q[: int((~valid[0]).sum()), 0].unsqueeze(0)
    got = run(backend, q, k, key_scores_bias(k, valid))
    assert valid.gather(1, got[..., 0].T).all()
    assert torch.equal(got, brute_force(q, k, valid))


# torch.topk does not promise the lowest index among equal distances, so exact ties
# are checked on the native top-k kernel only (continuous data below covers both).
@pytest.mark.parametrize("top_k", [2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("n, C, M, d", [(7, 3, 13, 2), (37, 4, 50, 14), (19, 5, 16, 16), (64, 2, 33, 3)])
def test_native_top_k_matches_brute_force_exactly_with_ties(top_k, n, C, M, d):
    if top_k > M:
        pytest.skip("top_k above the number of keys")
    q, k = int_data(n, C, M, d, seed=n * 7 + M + top_k)
    got = run("native", q, k, top_k=top_k)
    assert got.shape == (n, C, top_k) and got.dtype == torch.long
    assert torch.equal(got, brute_force(q, k, top_k=top_k))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 30),
    C=st.integers(1, 4),
    M=st.integers(1, 70),
    d=st.integers(1, 16),
    top_k=st.integers(2, 10),
    seed=st.integers(0, 2**16),
)
def test_native_top_k_property(n, C, M, d, top_k, seed):
    """Any shape, any k up to M: the k nearest, nearest first, ties to the lowest index."""
    top_k = min(top_k, M)
    q, k = int_data(n, C, M, d, seed=seed, low=-2, high=3)
    g = torch.Generator().manual_seed(seed + 1)
    valid = torch.rand(C, M, generator=g) < 0.8
    valid[:, :top_k] = True  # at least top_k selectable keys per head
    got = run("native", q, k, key_scores_bias(k, valid), top_k=top_k)
    assert torch.equal(got, brute_force(q, k, valid, top_k=top_k))


def test_native_top_k_with_fewer_selectable_keys_than_k():
    # Two of six keys are selectable: they come first (nearest first), then the
    # lowest other indices, so every row still names k distinct keys.
    q, k = int_data(20, 2, 6, 3, seed=4)
    valid = torch.zeros(2, 6, dtype=torch.bool)
    valid[:, [2, 5]] = True
    got = run("native", q, k, key_scores_bias(k, valid), top_k=4)
    assert torch.equal(got[..., :2], brute_force(q, k, valid, top_k=2))
    assert torch.equal(got[..., 2:].sort(-1).values, torch.tensor([0, 1]).expand(20, 2, 2))
    assert (got.sort(-1).values.diff(dim=-1) > 0).all()


def test_search_backend_is_native_up_to_the_top_k_limit():
    q = torch.zeros(1, 1, 2)
    if _native.nearest_topk_fn() is None:
        pytest.skip(f"native kernel unavailable: {_native.state.get('error')}")
    assert search_backend(q, 4) == search_backend(q, _search.NATIVE_MAX_TOP_K) == "native"
    assert search_backend(q, _search.NATIVE_MAX_TOP_K + 1) == "torch"


@pytest.mark.parametrize("top_k", [2, 5])
def test_top_k_is_sorted_nearest_first(top_k):
    # Continuous data: no ties, so the order of the top_k is unique.
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(50, 3, 6, generator=g), torch.randn(3, 30, 6, generator=g)
    valid = torch.rand(3, 30, generator=g) < 0.7
    got = nearest_keys(q, k, key_scores_bias(k, valid), top_k=top_k)
    assert got.shape == (50, 3, top_k)
    assert torch.equal(got, brute_force(q, k, valid, top_k=top_k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 3, 64, 1000])
def test_block_size_does_not_change_the_result(backend, block_size):
    q, k = int_data(130, 6, 70, 5, seed=4)
    assert torch.equal(run(backend, q, k, block_size=block_size), brute_force(q, k))


def test_float64_uses_torch_and_is_exact():
    q, k = int_data(40, 3, 20, 5, seed=5, dtype=torch.float64)
    assert search_backend(q) == "torch"
    assert torch.equal(nearest_keys(q, k), brute_force(q, k))


def test_native_threads_split_heads_or_samples():
    # Large enough for the threaded path; C=1 splits samples, C=5 splits heads.
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n, C in ((4200, 1), (900, 5)):
            q, k = int_data(n, C, 1024, 3, seed=6 + C)
            # Integer data: float64 cdist is exact, argmin takes the first minimum.
            expected = torch.cdist(q.double().transpose(0, 1), k.double()).argmin(-1).T.unsqueeze(-1)
            assert torch.equal(run("native", q, k), expected)
    finally:
        torch.set_num_threads(prev)


def test_empty_and_too_many_keys():
    k = torch.zeros(2, 3, 4)
    assert nearest_keys(torch.zeros(0, 2, 4), k).shape == (0, 2, 1)
    with pytest.raises(ValueError, match="top_k=4 exceeds the number of keys"):
        nearest_keys(torch.zeros(1, 2, 4), k, top_k=4)


def test_disabled_native_falls_back_to_torch(monkeypatch):
    monkeypatch.setenv("SKDKVB_NATIVE", "0")
    assert search_backend(torch.zeros(1, 1, 2)) == "torch"
    q, k = int_data(30, 2, 9, 3, seed=7)
    assert torch.equal(nearest_keys(q, k), brute_force(q, k))


def test_broken_compiler_degrades_gracefully(monkeypatch, tmp_path):
    monkeypatch.setattr(_native, "state", {})
    monkeypatch.setattr(_native, "_warned", False)
    monkeypatch.setenv("SKDKVB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(_native.NativeUnavailableWarning):
        assert search_backend() == "torch"
    assert "error" in _native.state
    q, k = int_data(30, 2, 9, 3, seed=8)
    assert torch.equal(nearest_keys(q, k), brute_force(q, k))


def test_block_size_for_fits_the_budget():
    for heads, keys in [(256, 4096), (4, 16), (1, 10**9)]:
        b = block_size_for(heads, keys)
        assert b >= 1
        assert b == 1 or 4 * heads * keys * b <= _search.DEFAULT_BLOCK_BYTES


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    C=st.integers(1, 4),
    M=st.integers(1, 40),
    d=st.integers(1, 16),
    seed=st.integers(0, 2**16),
    prune=st.floats(0.0, 0.9),
)
def test_property_equals_brute_force(n, C, M, d, seed, prune):
    q, k = int_data(n, C, M, d, seed)
    g = torch.Generator().manual_seed(seed + 1)
    valid = torch.rand(C, M, generator=g) >= prune
    valid[:, 0] |= ~valid.any(1)  # at least one selectable key per head
    bias = key_scores_bias(k, valid)
    expected = brute_force(q, k, valid)
    assert torch.equal(nearest_keys(q, k, bias), expected)
    assert torch.equal(_search._torch_search(q, k, bias, 1, None), expected)


def test_modified_keys_are_not_served_from_cache():
    q, k = int_data(50, 2, 20, 3, seed=9)
    first = nearest_keys(q, k)
    assert torch.equal(first, brute_force(q, k))
    k.mul_(-1)  # in place: same tensor object, new version
    assert torch.equal(nearest_keys(q, k), brute_force(q, k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 9, 10, 11, 17, 18, 23])
def test_exact_ties_across_lanes_and_blocks_go_to_the_lowest_index(backend, n):
    # Several copies of the nearest key in different vector lanes and key blocks
    # (16 keys per block) and rows that fill whole register tiles and tails.
    q, k = int_data(n, 3, 300, 14, seed=n)
    copies = [7, 23, 39, 200, 299]
    for c in range(3):
        for i in copies:
            k[c, i] = q[0, c]  # distance 0 for query 0, tied five times
    got = run(backend, q, k)
    assert torch.equal(got, brute_force(q, k))
    assert (got[0, :, 0] == copies[0]).all()


# --- int8 (VNNI) shortlist + float32 re-check: bit-identical to the float32 kernel ---


def int8_or_skip():
    lowp = _native.nearest_lp_fn() if _native.nearest_fn() is not None else None
    if lowp is None:
        lowp = _native.state.get("nearest_lp")
    if lowp is None:
        pytest.skip("int8 search kernel unavailable (no AVX-512 VNNI build/CPU)")
    return lowp


def both(queries, keys, bias=None):
    """(float32 kernel, int8 kernel, int8 counters) on the same inputs; the int16 kernel must agree too."""
    lowp = int8_or_skip()
    if bias is None:
        bias = key_scores_bias(keys)
    fp = _native.nearest_fn()
    stats = torch.zeros(5, dtype=torch.int64)
    stats16 = torch.zeros(5, dtype=torch.int64)
    ref = _search._native_search(fp, queries, keys, bias)
    got = _search._native_search(fp, queries, keys, bias, lowp=lowp, stats=stats, bits=8)
    got16 = _search._native_search(fp, queries, keys, bias, lowp=lowp, stats=stats16, bits=16)
    assert torch.equal(got16, ref)
    assert stats16[0] + stats16[2] <= queries.shape[0] * queries.shape[1]
    return ref, got, stats


def test_int8_precision_switch(monkeypatch):
    int8_or_skip()
    monkeypatch.delenv("SKDKVB_SEARCH_PRECISION", raising=False)
    assert _native.search_precision() == "int8"  # the default where the CPU has VNNI
    monkeypatch.setenv("SKDKVB_SEARCH_PRECISION", "float32")
    assert _native.search_precision() == "float32"
    assert _native.backend_info()["search_precision"] == "float32"
    q, k = int_data(64, 3, 100, 14, seed=11)
    for precision in ("int8", "int16"):
        monkeypatch.setenv("SKDKVB_SEARCH_PRECISION", precision)
        assert _native.search_precision() == precision
        assert torch.equal(nearest_keys(q, k), brute_force(q, k))
    monkeypatch.setenv("SKDKVB_SEARCH_PRECISION", "bogus")
    with pytest.raises(ValueError, match="SKDKVB_SEARCH_PRECISION='bogus'"):
        _native.search_precision()


@pytest.mark.parametrize(
    "n, C, M, d", [(32, 1, 1, 1), (40, 3, 50, 14), (100, 2, 257, 14), (64, 4, 33, 3), (45, 2, 300, 16), (70, 1, 40, 7)]
)
def test_int8_matches_brute_force_on_integer_ties(n, C, M, d):
    q, k = int_data(n, C, M, d, seed=n + M + d)
    ref, got, stats = both(q, k)
    assert torch.equal(got.unsqueeze(-1), brute_force(q, k))
    assert torch.equal(got, ref)
    assert stats[0] == n * C  # every query-head went through the int8 pass


@pytest.mark.parametrize("scale, offset", [(1.0, 0.0), (1e-20, 0.0), (1e12, 0.0), (0.01, 50.0), (3.0, -1e4)])
def test_int8_identical_to_float32_on_continuous_data(scale, offset):
    g = torch.Generator().manual_seed(12)
    k = torch.randn(3, 1000, 14, generator=g) * scale + offset
    q = torch.randn(200, 3, 14, generator=g) * scale + offset
    ref, got, stats = both(q, k)
    assert torch.equal(got, ref)
    assert stats[0] + stats[2] == 200 * 3


def test_int8_adversarial_near_ties():
    g = torch.Generator().manual_seed(13)
    C, M, d, n = 2, 512, 14, 96
    k = torch.randn(C, M, d, generator=g)
    q = torch.randn(n, C, d, generator=g)
    # keys one ulp apart from a query's nearest key, duplicated keys, and queries
    # halfway between two keys (equidistant up to rounding)
    for c in range(C):
        for i in range(0, 32):
            base = q[i, c].clone()
            k[c, 5 * i] = base
            k[c, 5 * i + 1] = torch.nextafter(base, torch.full_like(base, float("inf")))
            k[c, 5 * i + 2] = base  # exact duplicate: lowest index wins
            k[c, 5 * i + 3] = torch.nextafter(base, torch.full_like(base, -float("inf")))
        for i in range(32, 64):
            a, b = k[c, 300 + i], k[c, 400 + i]
            q[i, c] = (a + b) / 2
        for i in range(64, 96):  # a duplicate pair far away in the index order
            k[c, M - 1 - (i - 64)] = k[c, i]
            q[i, c] = k[c, i] + 1e-7
    ref, got, _ = both(q, k)
    assert torch.equal(got, ref)
    # the duplicate tie is resolved to the lower index, as the float32 kernel does
    assert (got[:32] % 5 != 2).all()


def test_int8_pruned_keys_and_degenerate_heads():
    g = torch.Generator().manual_seed(14)
    C, M, d, n = 5, 200, 14, 64
    k = torch.randn(C, M, d, generator=g)
    q = torch.randn(n, C, d, generator=g)
    valid = torch.rand(C, M, generator=g) < 0.5
    valid[1] = False  # head with no selectable key (float32 kernel answers 0)
    valid[2] = False
    valid[2, 150] = True  # exactly one selectable key
    k[3, :, 4] = 2.5  # a constant dimension
    pruned = (~valid[4]).nonzero()[:, 0]
    k[4, pruned[:n]] = q[: len(pruned[:n]), 4]  # pruned keys that are exact matches
    k[4, pruned[n:], 0] = float("nan")  # and garbage in other pruned keys
    bias = key_scores_bias(k, valid)
    ref, got, stats = both(q, k, bias)
    assert torch.equal(got, ref)
    assert (got[:, 1] == 0).all() and (got[:, 2] == 150).all()
    for c in (0, 2, 3, 4):
        assert valid[c, got[:, c]].all()
    assert int(stats[3]) >= 1  # the empty head went to float32


def test_int8_non_finite_queries_fall_back_per_query():
    g = torch.Generator().manual_seed(15)
    k = torch.randn(2, 100, 14, generator=g)
    q = torch.randn(50, 2, 14, generator=g)
    q[3, 0, 2] = float("nan")
    q[7, 1, 0] = float("inf")
    q[9, 0] = 3e37  # large enough that float32 distances could overflow
    ref, got, stats = both(q, k)
    assert torch.equal(got, ref)
    assert int(stats[2]) >= 3


@pytest.mark.parametrize("offset_scale", [0.0, 1e-3, 1.0, 30.0])
def test_int8_distance_aware_bound_with_general_bias(offset_scale):
    # The threshold bounds each key's query-rounding error by w ||k - q||, with the
    # distance read off the scores: a bias that is not ||k||^2 (offsets of either sign)
    # shifts that reading, queries far from every key make it large, and queries that
    # copy a key (plus one ulp) make it tiny; all must keep the float32 answer.
    g = torch.Generator().manual_seed(17)
    C, M, d, n = 3, 700, 14, 160
    k = torch.randn(C, M, d, generator=g)
    k[0] *= torch.logspace(-3, 2, d)  # very different ranges per dimension
    q = torch.randn(n, C, d, generator=g)
    q[:40] = k[:, :40].transpose(0, 1)  # exact copies of keys
    near = k[:, 40:80].transpose(0, 1)
    q[40:80] = torch.nextafter(near, torch.full_like(near, float("inf")))  # one ulp off a key
    q[80:100] *= 1e3  # far from every key
    q[100:120] = 0.5 * (k[:, 100:120] + k[:, 200:220]).transpose(0, 1)  # halfway between two keys
    bias = key_scores_bias(k) + offset_scale * torch.randn(C, M, generator=g)
    bias[1, ::7] = float("inf")  # pruned keys among them
    ref, got, stats = both(q, k, bias)
    assert torch.equal(got, ref)
    assert stats[0] == n * C


@pytest.mark.parametrize("kind", ["cauchy", "offset", "lowrank", "near_duplicates", "sparse_nonnegative"])
def test_int8_identical_on_heavy_tailed_and_structured_data(kind):
    # Data that stresses the per-dimension scales (heavy tails, a large common offset),
    # puts many keys at nearly the same distance (low rank, near duplicates) or makes
    # most coordinates exactly equal (sparse): the threshold must still hold everywhere.
    g = torch.Generator().manual_seed(18)
    C, M, d, n = 2, 2000, 14, 300
    if kind == "cauchy":
        k = torch.tan(torch.pi * (torch.rand(C, M, d, generator=g) - 0.5)).clamp(-1e6, 1e6)
        q = torch.randn(n, C, d, generator=g) * 3
    elif kind == "offset":
        k = 100 + torch.randn(C, M, d, generator=g)  # at 1e3 the scores would leave int32: float32
        q = 100 + torch.randn(n, C, d, generator=g)
    elif kind == "lowrank":
        basis = torch.randn(C, 2, d, generator=g)
        k = torch.einsum("cmr,crd->cmd", torch.randn(C, M, 2, generator=g), basis)
        q = torch.einsum("ncr,crd->ncd", torch.randn(n, C, 2, generator=g), basis)
        k = k + 1e-4 * torch.randn(C, M, d, generator=g)
    elif kind == "near_duplicates":
        base = torch.randn(C, M // 8, d, generator=g)
        k = base.repeat_interleave(8, dim=1)
        k = k + torch.randint(-2, 3, k.shape, generator=g) * 1e-6
        q = base[:, torch.randint(0, M // 8, (n,), generator=g)].transpose(0, 1).contiguous()
    else:
        k = torch.relu(torch.randn(C, M, d, generator=g) - 1.0) * 50
        q = torch.relu(torch.randn(n, C, d, generator=g) - 1.0) * 50
    ref, got, stats = both(q.contiguous(), k.contiguous())
    assert torch.equal(got, ref)
    assert stats[0] == n * C  # all through the integer pass


def test_int8_threads_and_sample_split():
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(16)
        for n, C in ((3000, 1), (300, 4)):
            k = torch.randn(C, 2048, 14, generator=g)
            q = torch.randn(n, C, 14, generator=g)
            ref, got, _ = both(q, k)
            assert torch.equal(got, ref)
    finally:
        torch.set_num_threads(prev)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(32, 80),
    C=st.integers(1, 3),
    M=st.integers(1, 80),
    d=st.integers(1, 16),
    seed=st.integers(0, 2**16),
    prune=st.floats(0.0, 0.9),
    kind=st.sampled_from(["int", "normal", "clustered", "lattice"]),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
)
def test_property_int8_equals_float32(n, C, M, d, seed, prune, kind, scale):
    g = torch.Generator().manual_seed(seed)
    if kind == "int":
        q, k = int_data(n, C, M, d, seed)
    elif kind == "normal":
        q, k = torch.randn(n, C, d, generator=g), torch.randn(C, M, d, generator=g)
    elif kind == "clustered":  # keys near a common offset, queries copies of keys plus tiny noise
        k = 10 + 1e-3 * torch.randn(C, M, d, generator=g)
        q = k[:, torch.randint(0, M, (n,), generator=g)].transpose(0, 1) + 1e-6 * torch.randn(n, C, d, generator=g)
    else:  # coarse lattice: many exact and near-exact ties
        q = torch.randint(-2, 3, (n, C, d), generator=g).float() * 0.1
        k = torch.randint(-2, 3, (C, M, d), generator=g).float() * 0.1
    q, k = (q * scale).contiguous(), (k * scale).contiguous()
    valid = torch.rand(C, M, generator=g) >= prune
    bias = key_scores_bias(k, valid)
    ref, got, _ = both(q, k, bias)
    assert torch.equal(got, ref)
    if kind == "int" and scale == 1.0:
        valid[:, 0] |= ~valid.any(1)
        bias = key_scores_bias(k, valid)
        ref, got, _ = both(q, k, bias)
        assert torch.equal(got.unsqueeze(-1), brute_force(q, k, valid))
