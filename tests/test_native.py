"""The native kernel library: cache verification, the fallback warning, worker threads, fork, and the row kernels.

The row kernels are checked against plain torch on small data, with rows both
narrower and wider than one 16-lane vector, so that the masked AVX-512 path
and the scalar loop both run (``.ci/kernels.sh`` repeats this file with a
portable build and under AddressSanitizer/UBSan).
"""

import _thread
import math
import multiprocessing
import threading
import time
import warnings

import pytest
import torch

from skdkvb import _native, _search, _threads


def native_or_skip():
    if _native.nearest_fn() is None:
        pytest.skip(f"native kernels unavailable: {_native.state.get('error')}")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A fresh load state and an empty cache folder; the real state is restored afterwards."""
    monkeypatch.setattr(_native, "state", {})
    monkeypatch.setattr(_native, "_warned", False)
    monkeypatch.setenv("SKDKVB_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SKDKVB_NATIVE", raising=False)
    return tmp_path


def reload():
    """Forget the loaded library (not the cache) and load again."""
    _native.state.clear()
    return _native.nearest_fn()


def library(cache):
    (path,) = cache.glob("kernels_*.so")
    return path


@pytest.mark.parametrize("damage", ["empty", "truncated", "flipped", "no-sidecar"])
def test_damaged_cache_is_rebuilt_not_loaded(fresh, damage):
    if _native._compiler() is None:
        pytest.skip("no C++ compiler")
    assert _native.nearest_fn() is not None, _native.state.get("error")
    path = library(fresh)
    good = path.read_bytes()
    bad = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "flipped": good[:100] + bytes([good[100] ^ 1]) + good[101:],
    }
    if damage in bad:
        # A new file in its place: this process still maps the old one, which must stay intact.
        tmp = fresh / "damaged"
        tmp.write_bytes(bad[damage])
        tmp.replace(path)
    else:
        _native._sidecar(path).unlink()
    assert _native._verified(path) is None
    # Loading a truncated file would SIGBUS; it must be rebuilt first.
    assert reload() is not None, _native.state.get("error")
    assert _native._verified(path) is not None
    assert path.stat().st_size == len(good)


def test_verified_cache_is_not_rebuilt(fresh, monkeypatch):
    if _native._compiler() is None:
        pytest.skip("no C++ compiler")
    assert _native.nearest_fn() is not None
    calls = []
    monkeypatch.setattr(_native, "_compile", lambda *a: calls.append(a))
    assert reload() is not None
    assert calls == []


def test_broken_compiler_warns_once_with_reason_and_fix(fresh, monkeypatch):
    monkeypatch.setenv("CXX", str(fresh / "no-such-compiler"))
    with pytest.warns(_native.NativeUnavailableWarning, match="no-such-compiler.*SKDKVB_NATIVE=0"):
        assert _native.nearest_fn() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.gather_fn() is None  # once only
    info = _native.backend_info()
    assert info["backend"] == "torch" and "no-such-compiler" in info["error"]


def test_compiler_error_is_reported(fresh, monkeypatch):
    fake = fresh / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fatal: kaput' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.warns(_native.NativeUnavailableWarning, match="kaput"):
        assert _native.scatter_fn() is None


def test_unwritable_cache_dir_warns(fresh, monkeypatch):
    blocker = fresh / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SKDKVB_CACHE_DIR", str(blocker / "cache"))
    with pytest.warns(_native.NativeUnavailableWarning, match="SKDKVB_CACHE_DIR"):
        assert _native.nearest_fn() is None
    q = torch.randint(-3, 4, (20, 2, 3)).float()
    k = torch.randint(-3, 4, (2, 7, 3)).float()
    assert torch.equal(
        _search.nearest_keys(q, k),
        _search._torch_search(q, k, _search.key_scores_bias(k), 1, None),
    )


def test_explicitly_disabled_does_not_warn(fresh, monkeypatch):
    monkeypatch.setenv("SKDKVB_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.nearest_fn() is None
        assert _search.search_backend() == "torch"
    info = _native.backend_info()
    assert info["enabled"] is False and info["backend"] == "torch"


def test_backend_info_describes_the_build():
    info = _native.backend_info()
    assert {
        "backend",
        "compiler",
        "flags",
        "build_isa",
        "cpu_features",
        "cache_path",
        "threads",
        "error",
    } <= set(info)
    assert info["threads"] == _threads.available_cpus()
    if info["backend"] == "native":
        assert info["error"] is None and info["build_isa"]
        assert info["cache_path"].endswith(".so") and "-O3" in info["flags"]


def test_portable_and_extra_flags_change_the_cache_key(monkeypatch):
    monkeypatch.delenv("SKDKVB_NATIVE_PORTABLE", raising=False)
    monkeypatch.delenv("SKDKVB_NATIVE_FLAGS", raising=False)
    compiler = "c++"
    default = _native._library_path(compiler)
    monkeypatch.setenv("SKDKVB_NATIVE_PORTABLE", "1")
    portable = _native._library_path(compiler)
    assert all("-march=native" not in flags for flags in _native._flag_sets())
    monkeypatch.setenv("SKDKVB_NATIVE_FLAGS", "-g")
    assert len({default, portable, _native._library_path(compiler)}) == 3


# --- worker threads ---------------------------------------------------------


def test_run_split_waits_for_every_worker_before_raising():
    done = []

    def work(i):
        if i == 0:
            raise ValueError("first range failed")
        time.sleep(0.2)
        done.append(i)

    with pytest.raises(ValueError, match="first range failed"):
        _native.run_split(work, (), [(0,), (1,), (2,)])
    assert sorted(done) == [1, 2]


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="needs the main thread",
)
def test_run_split_interrupted_waiter_still_waits():
    done = []

    def work(i):
        if i == 0:
            _thread.interrupt_main()  # KeyboardInterrupt in the waiting (main) thread
        time.sleep(0.3)
        done.append(i)

    with pytest.raises(KeyboardInterrupt):
        _native.run_split(work, (), [(0,), (1,)])
    assert sorted(done) == [0, 1]  # no worker still running when run_split returned


def test_run_split_grows_the_pool():
    seen = []
    for n in (2, 4, 3):
        _native.run_split(lambda i: seen.append(i), (), [(i,) for i in range(n)])
    assert sorted(seen) == sorted([0, 1] + [0, 1, 2, 3] + [0, 1, 2])
    assert _native._pool_size >= 4


def _child_search(conn):
    torch.set_num_threads(2)
    q = torch.randint(-3, 4, (1024, 4, 3), generator=torch.Generator().manual_seed(0)).float()
    k = torch.randint(-3, 4, (4, 1024, 3), generator=torch.Generator().manual_seed(1)).float()
    conn.send(_search.nearest_keys(q, k).sum().item())
    conn.close()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_forked_child_can_run_the_split_search(monkeypatch):
    native_or_skip()
    monkeypatch.setattr(_search, "available_cpus", lambda: 2)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q = torch.randint(-3, 4, (1024, 4, 3), generator=torch.Generator().manual_seed(0)).float()
        k = torch.randint(-3, 4, (4, 1024, 3), generator=torch.Generator().manual_seed(1)).float()
        expected = _search.nearest_keys(q, k).sum().item()  # the parent's pool now has threads
        assert _native._pool is not None
    finally:
        torch.set_num_threads(prev)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child_search, args=(child,))
    proc.start()
    try:
        assert parent.poll(60), "the forked child hung in the native pool"
        assert parent.recv() == expected
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


# --- row kernels against torch ------------------------------------------------


def rows_data(B, S, n_rows, K, seed):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n_rows, K, generator=g)
    flat = torch.randint(0, n_rows, (B, S), generator=g, dtype=torch.int32)
    coef = torch.rand(B, S, generator=g)
    return table, flat, coef


@pytest.mark.parametrize("K", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("with_coef", [False, True])
def test_gather_rows_matches_torch(K, with_coef):
    native_or_skip()
    table, flat, coef = rows_data(33, 6, 50, K, seed=K)
    out = torch.zeros(33, K)
    c = coef if with_coef else None
    _native.gather_fn()(
        table.data_ptr(),
        K,
        flat.data_ptr(),
        33,
        6,
        None if c is None else c.data_ptr(),
        out.data_ptr(),
    )
    w = c if c is not None else torch.ones(33, 6)
    expected = (table[flat.long()] * w.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("with_coef", [False, True])
def test_scatter_rows_matches_torch(K, with_coef):
    native_or_skip()
    table, flat, coef = rows_data(29, 4, 12, K, seed=100 + K)  # few rows: many duplicates accumulate
    g = torch.randn(29, K, generator=torch.Generator().manual_seed(K))
    c = coef if with_coef else None
    expected = table.clone()
    w = c if c is not None else torch.ones(29, 4)
    upd = (-0.5 * w).unsqueeze(-1) * g.unsqueeze(1)  # (B, S, K)
    expected.index_add_(0, flat.long().reshape(-1), upd.reshape(-1, K))
    _native.scatter_fn()(
        table.data_ptr(),
        K,
        flat.data_ptr(),
        29,
        4,
        g.data_ptr(),
        None if c is None else c.data_ptr(),
        -0.5,
        0,
        4,
    )
    torch.testing.assert_close(table, expected, rtol=1e-5, atol=1e-5)


def test_fma_loop_runs():
    native_or_skip()
    value = _native.fma_loop_fn()(1000)
    assert math.isfinite(value) and abs(value) < 1e6  # no overflow


# --- thread cap ---------------------------------------------------------------


def test_cgroup_quota_is_read(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cpu.max").write_text("150000 100000\n")
    assert _threads._cgroup_quota(tmp_path / "a") == 1.5
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cpu.max").write_text("max 100000\n")
    assert _threads._cgroup_quota(tmp_path / "b") is None
    (tmp_path / "c" / "cpu").mkdir(parents=True)  # cgroup v1
    (tmp_path / "c" / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "c" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _threads._cgroup_quota(tmp_path / "c") == 3.0


def test_cap_only_lowers_torch_threads(monkeypatch):
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        monkeypatch.setenv(_threads.ENV, "1")
        assert _threads.cap_torch_threads() == 1
        monkeypatch.setenv(_threads.ENV, "4")
        assert _threads.cap_torch_threads() == 1  # never raised
        monkeypatch.setenv(_threads.ENV, "0")
        torch.set_num_threads(3)
        assert _threads.cap_torch_threads() == 3  # 0: no cap
        monkeypatch.setenv(_threads.ENV, "many")
        with pytest.warns(RuntimeWarning, match="SKDKVB_NUM_THREADS='many'"):
            assert _threads.cap_torch_threads() == 3
    finally:
        torch.set_num_threads(prev)


def test_default_cap_is_the_usable_cpus(monkeypatch):
    monkeypatch.delenv(_threads.ENV, raising=False)
    monkeypatch.setattr(_threads, "_cgroup_quota", lambda: 1.0)
    assert _threads.thread_cap() == 1 == _threads.available_cpus()


def test_limit_torch_threads_restores_even_on_error():
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(KeyboardInterrupt), _threads.limit_torch_threads(1) as inside:
            assert inside == 1 == torch.get_num_threads()
            raise KeyboardInterrupt
        assert torch.get_num_threads() == 2
        with _threads.limit_torch_threads(5) as inside:
            assert inside == 2  # never raised
    finally:
        torch.set_num_threads(prev)


def test_kernel_sources_ship_with_the_package():
    names = {p.name for p in _native._sources()}
    assert {"search.cpp", "rows.cpp", "info.cpp"} <= names
    assert (_native.KERNEL_DIR / "common.h").is_file()
