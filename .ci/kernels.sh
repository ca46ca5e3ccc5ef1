#!/usr/bin/env bash
# Kernel checks: build skdkvb/_kernels with AddressSanitizer + UBSan and run the
# kernel tests against it (the int8/int16 search of search_lp.h included, on VNNI CPUs) (and check that the sanitizer really catches an
# out-of-bounds read), then force the portable build (no -march=native: 4-lane
# vectors and the scalar row loops run even on an AVX-512 machine) and an AVX2
# build (8 lanes) and run them again. About 1-2 minutes on 2 cores. Needs g++
# (or $CXX) with libasan.
set -euo pipefail
cd "$(dirname "$0")/.."
CXX="${CXX:-c++}"
TESTS=(tests/test_native.py tests/test_search.py)
cache="$(mktemp -d)"
trap 'rm -rf "$cache"' EXIT

echo "== kernels: AddressSanitizer + UndefinedBehaviorSanitizer =="
libasan="$("$CXX" -print-file-name=libasan.so)"
[ -e "$libasan" ] || { echo "libasan not found for $CXX" >&2; exit 1; }
# The sanitized library aborts on the first error; Python itself is not
# instrumented, so leak checking is off (it would report the interpreter).
SKDKVB_CACHE_DIR="$cache/asan" \
SKDKVB_NATIVE_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
LD_PRELOAD="$libasan" \
    python -m pytest -q -p no:cacheprovider "${TESTS[@]}"
# The sanitizer must be live: a gather one row past the end of the table must abort.
if SKDKVB_CACHE_DIR="$cache/asan" \
   SKDKVB_NATIVE_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g" \
   ASAN_OPTIONS="detect_leaks=0" LD_PRELOAD="$libasan" python - 2>"$cache/asan.log" <<'PY'
import torch
from skdkvb import _native

table = torch.zeros(4, 40)
flat = torch.tensor([[4]], dtype=torch.int32)  # out of range
out = torch.zeros(1, 40)
_native.gather_fn()(table.data_ptr(), 40, flat.data_ptr(), 1, 1, None, out.data_ptr())
PY
then
    echo "AddressSanitizer did not catch an out-of-bounds read: the sanitized build is not active" >&2
    exit 1
fi
grep -q "AddressSanitizer" "$cache/asan.log" || { cat "$cache/asan.log" >&2; exit 1; }
echo "sanitizer is live (out-of-bounds read caught)"
# On a CPU with AVX-512 VNNI the int8/int16 search (search_lp.h) must have run under the
# sanitizer above, not been skipped.
if grep -qw avx512_vnni /proc/cpuinfo 2>/dev/null; then
    SKDKVB_CACHE_DIR="$cache/asan" SKDKVB_SEARCH_PRECISION=int8 ASAN_OPTIONS="detect_leaks=0" LD_PRELOAD="$libasan" \
        python -c "from skdkvb import _native; p = _native.search_precision(); print('search precision:', p); assert p == 'int8', p"
fi

echo "== kernels: portable build (no -march=native) =="
SKDKVB_CACHE_DIR="$cache/portable" SKDKVB_NATIVE_PORTABLE=1 \
    python -m pytest -q -p no:cacheprovider "${TESTS[@]}"
# AVX2 (8 lanes), where the CPU can run it: the third vector width of the kernels.
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
    echo "== kernels: AVX2 build =="
    SKDKVB_CACHE_DIR="$cache/avx2" SKDKVB_NATIVE_PORTABLE=1 SKDKVB_NATIVE_FLAGS="-mavx2 -mfma" \
        python -m pytest -q -p no:cacheprovider "${TESTS[@]}"
fi
# The portable build must really be the one that ran.
SKDKVB_CACHE_DIR="$cache/portable" SKDKVB_NATIVE_PORTABLE=1 python - <<'PY'
from skdkvb._native import backend_info

info = backend_info()
print(info)
assert info["backend"] == "native", info
assert "-march=native" not in (info["flags"] or ""), info
assert info["build_isa"] != "avx512", info
PY
# Without AVX-512 VNNI in the build, asking for int8 falls back to float32.
SKDKVB_CACHE_DIR="$cache/portable" SKDKVB_NATIVE_PORTABLE=1 SKDKVB_SEARCH_PRECISION=int8 \
    python -c "from skdkvb import _native; p = _native.search_precision(); assert p == 'float32', p"

