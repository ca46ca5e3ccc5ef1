/* Row gather/scatter of the mean decoder's SGD step: read and update the
   value rows that a batch selected, one head's block of the table at a time. */
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define PREFETCH 16

/* Prefetch a whole row: K floats may straddle two cache lines. */
static inline void prefetch_row(const float *row, int64_t K, int write)
{
    if (write) {
        __builtin_prefetch(row, 1);
        __builtin_prefetch(row + K - 1, 1);
    } else {
        __builtin_prefetch(row, 0);
        __builtin_prefetch(row + K - 1, 0);
    }
}

/* row[0:K] += c * v[0:K]. With AVX-512 and K <= 16 a row is one masked
   vector load/FMA/store instead of K scalar steps; otherwise (portable build,
   or wide rows) a plain loop the compiler vectorises for the target. */
static inline void axpy_row(float *row, const float *v, float c, int64_t K)
{
#if defined(__AVX512F__)
    if (K <= 16) {
        __mmask16 m = (__mmask16)((1u << K) - 1u);
        __m512 r = _mm512_maskz_loadu_ps(m, row);
        __m512 x = _mm512_maskz_loadu_ps(m, v);
        _mm512_mask_storeu_ps(row, m, _mm512_fmadd_ps(_mm512_set1_ps(c), x, r));
        return;
    }
#endif
    for (int64_t k = 0; k < K; k++) row[k] += c * v[k];
}

/* SGD update of the mean decoder: for every sample i and selection s,
   table[flat[i, s], :] += alpha * coef[i, s] * g[i, :] (coef = 1 when NULL).
   Selection-major: the selections of one head index one head's block of the
   table (M * K floats, 160 KB at the paper's size), which then stays in L2
   while all samples of the batch update it; sample-major order would jump
   across the whole table on every row. Selections [s0, s1) must cover whole
   heads so that concurrent callers own disjoint rows. */
extern "C" void skdkvb_scatter_rows(float *table, int64_t K, const int32_t *flat,
                                    int64_t B, int64_t S, const float *g,
                                    const float *coef, float alpha,
                                    int64_t s0, int64_t s1)
{
    for (int64_t s = s0; s < s1; s++) {
        for (int64_t i = 0; i < B; i++) {
            /* rows are random within the head's block: fetch ahead so that
               several cache misses are in flight at once */
            if (i + PREFETCH < B) prefetch_row(table + (int64_t)flat[(i + PREFETCH) * S + s] * K, K, 1);
            float c = coef ? alpha * coef[i * S + s] : alpha;
            float *row = table + (int64_t)flat[i * S + s] * K;
            axpy_row(row, g + i * K, c, K);
        }
    }
}

/* out[i, :] += sum_s coef[i, s] * table[flat[i, s], :] (coef = 1 when NULL).
   The caller zeroes out. Selection-major for the same cache reason, in
   chunks of GATHER_CHUNK selections (heads): the chunk's blocks of the table
   (640 KB at the paper's size) stay in L2 while every sample's partial sum is
   updated once per chunk, not once per selection. With AVX-512 and K <= 16
   the partial sums live in an aligned scratch array of one vector per sample:
   updating rows of `out` in place (K floats apart, overlapping 64-byte
   windows) defeated store-to-load forwarding and ran 2x slower. */
#define GATHER_CHUNK 4
extern "C" void skdkvb_gather_rows(const float *table, int64_t K, const int32_t *flat,
                                   int64_t B, int64_t S, const float *coef, float *out)
{
#if defined(__AVX512F__)
    if (K <= 16) {
        __m512 *acc = (__m512 *)aligned_alloc(64, (size_t)(B > 0 ? B : 1) * sizeof(__m512));
        if (acc != NULL) {
            const __mmask16 m = (__mmask16)((1u << K) - 1u);
            for (int64_t i = 0; i < B; i++) acc[i] = _mm512_setzero_ps();
            for (int64_t s0 = 0; s0 < S; s0 += GATHER_CHUNK) {
                const int64_t s1 = s0 + GATHER_CHUNK < S ? s0 + GATHER_CHUNK : S;
                for (int64_t i = 0; i < B; i++) {
                    if (i + PREFETCH < B)
                        for (int64_t s = s0; s < s1; s++)
                            prefetch_row(table + (int64_t)flat[(i + PREFETCH) * S + s] * K, K, 0);
                    __m512 a = acc[i];
                    for (int64_t s = s0; s < s1; s++) {
                        const __m512 row = _mm512_maskz_loadu_ps(m, table + (int64_t)flat[i * S + s] * K);
                        a = _mm512_fmadd_ps(_mm512_set1_ps(coef ? coef[i * S + s] : 1.0f), row, a);
                    }
                    acc[i] = a;
                }
            }
            for (int64_t i = 0; i < B; i++)
                _mm512_mask_storeu_ps(out + i * K, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, out + i * K), acc[i]));
            free(acc);
            return;
        }
    }
#endif
    for (int64_t s = 0; s < S; s++) {
        for (int64_t i = 0; i < B; i++) {
            if (i + PREFETCH < B) prefetch_row(table + (int64_t)flat[(i + PREFETCH) * S + s] * K, K, 0);
            float c = coef ? coef[i * S + s] : 1.0f;
            const float *row = table + (int64_t)flat[i * S + s] * K;
            axpy_row(out + i * K, row, c, K);
        }
    }
}
