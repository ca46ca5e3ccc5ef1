/* Build and run-time facts about the kernels: the instruction set they were
   compiled for, the CPU features present now, and the FMA peak loop that the
   benchmarks divide by. */
#include <stdint.h>
#include <string.h>
#include "common.h"

/* Widest vector instruction set this build may use. */
extern "C" const char *skdkvb_build_isa(void)
{
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2+fma";
#elif defined(__AVX__)
    return "avx";
#elif defined(__SSE2__)
    return "sse2";
#elif defined(__ARM_NEON)
    return "neon";
#else
    return "generic";
#endif
}

/* Float lanes per vector in this build. */
extern "C" int skdkvb_lanes(void) { return SKDKVB_LANES; }

/* Space-separated CPU features detected at run time (x86 with GCC/clang). */
extern "C" const char *skdkvb_cpu_features(void)
{
    static char buf[256];
    buf[0] = 0;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_cpu_init();
#define FEATURE(name) if (__builtin_cpu_supports(name)) { strcat(buf, name); strcat(buf, " "); }
    FEATURE("sse4.2")
    FEATURE("avx")
    FEATURE("avx2")
    FEATURE("fma")
    FEATURE("avx512f")
    FEATURE("avx512bw")
    FEATURE("avx512vl")
    FEATURE("avx512vnni")
#if defined(__GNUC__) && (__GNUC__ >= 11 || defined(__clang__))
    FEATURE("avx512bf16")
#endif
#undef FEATURE
    size_t n = strlen(buf);
    if (n) buf[n - 1] = 0;
#endif
    return buf;
}

/* A register-resident chain of fused multiply-adds: 12 independent vector
   accumulators (enough to cover FMA latency x FMA ports on current cores),
   `iters` rounds. Returns a value derived from the accumulators so that the
   loop cannot be removed. FLOPs done: iters * 12 * skdkvb_lanes() * 2. */
extern "C" float skdkvb_fma_loop(int64_t iters)
{
    vf a[12];
    vf x = (vf){} + 0.999999f, y = (vf){} + 1e-7f;
    for (int r = 0; r < 12; r++) a[r] = (vf){} + (float)r;
    for (int64_t it = 0; it < iters; it++) {
        for (int r = 0; r < 12; r++) {
            a[r] = a[r] * x + y;
        }
    }
    vf s = (vf){};
    for (int r = 0; r < 12; r++) s += a[r];
    float t = 0.0f;
    for (int l = 0; l < SKDKVB_LANES; l++) t += s[l];
    return t;
}
