/* Nearest-key search: for every query of every head, the index of the key
   with the smallest squared distance, without ever writing a distance to
   memory. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "common.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* One head's keys, packed for the tile loop: blocks of SKDKVB_LANES keys
   (one vector), each block `d` rows of lanes holding -2 k, then one row
   holding the additive term (||k||^2, +inf for pruned keys and for the
   padding of the last block). D > 0 fixes d at compile time: full blocks are
   then a fixed-size transpose the compiler vectorises (packing is what a
   call with few queries spends most of its time on). */
#if defined(__AVX512F__)
/* Transpose a 16 x 16 block held in 16 registers: r[i][j] -> r[j][i]. */
static inline void transpose16(__m512 r[16])
{
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    /* per 128-bit chunk k, u[4g + m] holds column 4k + m of rows 4g..4g+3 */
    __m512 u[16];
    for (int g = 0; g < 4; g++) {
        const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * g + 2]), e = _mm512_castps_pd(t[4 * g + 3]);
        u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
    }
    for (int m = 0; m < 4; m++) {
        const __m512 lo01 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44), hi01 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xEE);
        const __m512 lo23 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44);
        const __m512 hi23 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xEE);
        r[m] = _mm512_shuffle_f32x4(lo01, lo23, 0x88);
        r[4 + m] = _mm512_shuffle_f32x4(lo01, lo23, 0xDD);
        r[8 + m] = _mm512_shuffle_f32x4(hi01, hi23, 0x88);
        r[12 + m] = _mm512_shuffle_f32x4(hi01, hi23, 0xDD);
    }
}
#endif

template <int D>
static void pack_head(const float *keys, const float *bias, int64_t M, int d_rt, float *pk)
{
    const int d = D > 0 ? D : d_rt;
    const int64_t nb = (M + SKDKVB_LANES - 1) / SKDKVB_LANES, stride = (int64_t)(d + 1) * SKDKVB_LANES;
    const int64_t full = M / SKDKVB_LANES;
    int64_t b0 = 0;
#if defined(__AVX512F__)
    if (d <= 16) { /* one key per register, then an in-register transpose */
        const __mmask16 m = (__mmask16)((1u << d) - 1u);
        const __m512 minus2 = _mm512_set1_ps(-2.0f);
        for (; b0 < full; b0++) {
            float *blk = pk + b0 * stride;
            const float *src = keys + b0 * 16 * d;
            __m512 r[16];
            for (int l = 0; l < 16; l++) r[l] = _mm512_maskz_loadu_ps(m, src + l * d);
            transpose16(r);
            for (int j = 0; j < d; j++) _mm512_store_ps(blk + j * 16, _mm512_mul_ps(r[j], minus2));
            _mm512_store_ps(blk + d * 16, _mm512_loadu_ps(bias + b0 * 16));
        }
    }
#endif
    for (int64_t b = b0; b < full; b++) {
        float *blk = pk + b * stride;
        const float *src = keys + b * SKDKVB_LANES * d;
        for (int j = 0; j < d; j++)
            for (int l = 0; l < SKDKVB_LANES; l++) blk[j * SKDKVB_LANES + l] = -2.0f * src[l * d + j];
        for (int l = 0; l < SKDKVB_LANES; l++) blk[d * SKDKVB_LANES + l] = bias[b * SKDKVB_LANES + l];
    }
    for (int64_t b = full; b < nb; b++) {
        float *blk = pk + b * stride;
        for (int l = 0; l < SKDKVB_LANES; l++) {
            const int64_t m = b * SKDKVB_LANES + l;
            for (int j = 0; j < d; j++) blk[j * SKDKVB_LANES + l] = m < M ? -2.0f * keys[m * d + j] : 0.0f;
            blk[d * SKDKVB_LANES + l] = m < M ? bias[m] : INFINITY;
        }
    }
}

/* Lowest index among the lanes holding the smallest value (torch.argmin's
   tie rule: within a lane the indices only grow, so strict < kept the first).
   Vectorised on AVX-512: a scalar loop here cost 5 % at M=4096 and half the
   time at M=256. */
static inline int64_t reduce_lanes(vf best, vi bidx)
{
#if defined(__AVX512F__)
    /* vector form: the minimum value, then the lowest index among its lanes */
    const __m512 b = (__m512)best;
    const float vmin = _mm512_reduce_min_ps(b);
    const __mmask16 at = _mm512_cmp_ps_mask(b, _mm512_set1_ps(vmin), _CMP_EQ_OQ);
    if (at) return _mm512_mask_reduce_min_epi32(at, (__m512i)bidx);
    /* no lane equals the minimum (NaN): fall through to the scalar rule */
#endif
    float bv = best[0];
    int32_t bi = bidx[0];
    for (int l = 1; l < SKDKVB_LANES; l++) {
        const float v = best[l];
        const int32_t i = bidx[l];
        if (v < bv || (v == bv && i < bi)) { bv = v; bi = i; }
    }
    return bi;
}

/* The distances of R queries to one packed block of keys: ||k||^2 plus the
   sum over the key dimension of (-2 k) q, as multiply-adds in a fixed order
   (every kernel, top-1 and top-k, computes exactly these values). */
template <int R, int D>
static inline __attribute__((always_inline)) void block_distances(const float *blk, const float *q, int64_t qs,
                                                                  int d_rt, vf acc[R])
{
    const int d = D > 0 ? D : d_rt;
    const vf bias = *(const vf *)(blk + d * SKDKVB_LANES);
    for (int s = 0; s < R; s++) acc[s] = bias;
    for (int j = 0; j < d; j++) {
        const vf k = *(const vf *)(blk + j * SKDKVB_LANES);
        for (int s = 0; s < R; s++) acc[s] += k * q[s * qs + j];
    }
}

/* R queries (rows of q, `qs` floats apart) against all `nb` packed key blocks:
   a register tile of R accumulators of SKDKVB_LANES keys. Each distance is folded into
   a per-lane running minimum and its index as soon as it is complete. D > 0
   fixes the key dimension at compile time (fully unrolled inner loop). */
template <int R, int D>
static void tile(const float *q, int64_t qs, const float *pk, int d_rt, int64_t nb, int64_t *out, int64_t os)
{
    const int d = D > 0 ? D : d_rt;
    const int64_t stride = (int64_t)(d + 1) * SKDKVB_LANES;
    vf best[R];
    vi bidx[R];
    vi cur;
    for (int l = 0; l < SKDKVB_LANES; l++) cur[l] = l;
    for (int s = 0; s < R; s++) { best[s] = (vf){} + INFINITY; bidx[s] = (vi){}; }
    for (int64_t b = 0; b < nb; b++) {
        vf acc[R];
        block_distances<R, D>(pk + b * stride, q, qs, d, acc);
        for (int s = 0; s < R; s++) {
            const vi lt = acc[s] < best[s];
            best[s] = lt ? acc[s] : best[s];
            bidx[s] = lt ? cur : bidx[s];
        }
        cur += SKDKVB_LANES;
    }
    for (int s = 0; s < R; s++) out[s * os] = reduce_lanes(best[s], bidx[s]);
}

/* Queries per register tile: R accumulators + R running minima + R indices
   must fit the 32 vector registers of AVX-512 (10 measured best on Zen 5). */
#if defined(__AVX512F__)
#define TILE_ROWS 10
#else
#define TILE_ROWS 4
#endif

template <int D>
static void head_rows(const float *q, int64_t qs, const float *pk, int d, int64_t nb, int64_t *out, int64_t os,
                      int64_t i0, int64_t i1)
{
    int64_t i = i0;
    for (; i + TILE_ROWS <= i1; i += TILE_ROWS) tile<TILE_ROWS, D>(q + i * qs, qs, pk, d, nb, out + i * os, os);
    /* the rest in decreasing tiles: a pass over the keys per tile, not per query */
    if (i + 8 <= i1) { tile<8, D>(q + i * qs, qs, pk, d, nb, out + i * os, os); i += 8; }
    if (i + 4 <= i1) { tile<4, D>(q + i * qs, qs, pk, d, nb, out + i * os, os); i += 4; }
    if (i + 2 <= i1) { tile<2, D>(q + i * qs, qs, pk, d, nb, out + i * os, os); i += 2; }
    if (i < i1) tile<1, D>(q + i * qs, qs, pk, d, nb, out + i * os, os);
}

/* One head c of queries [i0, i1) with the float32 tile loop; pk holds room for
   the head's packed keys. */
static void fp32_head(const float *q, int64_t C, int d, const float *keys, const float *bias, int64_t M,
                      int64_t *out, int64_t c, int64_t i0, int64_t i1, float *pk)
{
    const int64_t nb = (M + SKDKVB_LANES - 1) / SKDKVB_LANES;
    if (d == 14)
        pack_head<14>(keys + c * M * d, bias + c * M, M, d, pk);
    else
        pack_head<0>(keys + c * M * d, bias + c * M, M, d, pk);
    const float *qc = q + c * d;
    int64_t *oc = out + c;
    if (d == 14)
        head_rows<14>(qc, C * d, pk, d, nb, oc, C, i0, i1);
    else
        head_rows<0>(qc, C * d, pk, d, nb, oc, C, i0, i1);
}

/* Queries [i0, i1) x heads [c0, c1). q (n, C, d), keys (C, M, d), bias (C, M)
   (+inf for keys that must never win) and out (n, C), all contiguous. Head by
   head: the head's keys are packed once into a private buffer (d+1 floats per
   key, 240 KB at M=4096, d=14: it stays in L2) and all queries stream past.
   Returns 0, or -1 when the packing buffer cannot be allocated. */
extern "C" int skdkvb_nearest(const float *q, int64_t C, int d, const float *keys, const float *bias,
                              int64_t M, int64_t *out, int64_t c0, int64_t c1, int64_t i0, int64_t i1)
{
    const int64_t nb = (M + SKDKVB_LANES - 1) / SKDKVB_LANES;
    const size_t bytes = (size_t)nb * (size_t)(d + 1) * SKDKVB_LANES * sizeof(float);
    float *pk = (float *)aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (pk == NULL) return -1;
    for (int64_t c = c0; c < c1; c++) fp32_head(q, C, d, keys, bias, M, out, c, i0, i1, pk);
    free(pk);
    return 0;
}

/* ------------------------------------------------------------------ top-k
   The k nearest keys per query and head, nearest first, ties to the lowest
   index (a stable sort of the distances). The same packed blocks and the same
   float32 arithmetic as the top-1 tile; each query keeps its k best in a small
   sorted list, and a block is looked at lane by lane only when one of its
   distances beats the list's last entry (after the first blocks, rarely). */
static inline void topk_insert(float *bv, int64_t *bi, int k, float v, int64_t idx)
{
    int pos = k - 1;
    while (pos > 0 && bv[pos - 1] > v) { /* strict: an equal distance keeps its lower index first */
        bv[pos] = bv[pos - 1];
        bi[pos] = bi[pos - 1];
        pos--;
    }
    bv[pos] = v;
    bi[pos] = idx;
}

/* Keys left unset (fewer than k keys with a finite distance) get the lowest
   indices not yet chosen, so that the output is always k distinct keys. */
static void topk_fill(int64_t *bi, int k, int64_t M)
{
    int64_t next = 0;
    for (int j = 0; j < k; j++) {
        if (bi[j] >= 0) continue;
        for (;; next++) {
            int used = 0;
            for (int t = 0; t < k; t++) used |= bi[t] == next;
            if (!used) break;
        }
        bi[j] = next < M ? next++ : 0;
    }
}

template <int R, int D>
static void topk_tile(const float *q, int64_t qs, const float *pk, int d_rt, int64_t nb, int64_t M, int k,
                      float *bv, int64_t *bi, int64_t *out, int64_t os)
{
    const int d = D > 0 ? D : d_rt;
    const int64_t stride = (int64_t)(d + 1) * SKDKVB_LANES;
    for (int s = 0; s < R; s++)
        for (int j = 0; j < k; j++) { bv[s * k + j] = INFINITY; bi[s * k + j] = -1; }
    vf thr[R];
    for (int s = 0; s < R; s++) thr[s] = (vf){} + INFINITY;
    for (int64_t b = 0; b < nb; b++) {
        vf acc[R];
        block_distances<R, D>(pk + b * stride, q, qs, d, acc);
        for (int s = 0; s < R; s++) {
#if defined(__AVX512F__)
            unsigned hit = (unsigned)_mm512_cmp_ps_mask((__m512)acc[s], (__m512)thr[s], _CMP_LT_OQ);
            if (!hit) continue;
#else
            const vi lt = acc[s] < thr[s];
            unsigned hit = 0;
            for (int l = 0; l < SKDKVB_LANES; l++) hit |= (lt[l] ? 1u : 0u) << l;
            if (!hit) continue;
#endif
            float *v = bv + s * k;
            int64_t *ix = bi + s * k;
            for (int l = 0; l < SKDKVB_LANES; l++) /* ascending index: the first of equal distances wins */
                if (((hit >> l) & 1u) && acc[s][l] < v[k - 1]) topk_insert(v, ix, k, acc[s][l], b * SKDKVB_LANES + l);
            thr[s] = (vf){} + v[k - 1];
        }
    }
    for (int s = 0; s < R; s++) {
        topk_fill(bi + s * k, k, M);
        for (int j = 0; j < k; j++) out[s * os + j] = bi[s * k + j];
    }
}

/* Small k, branch-free: every lane keeps its own K best (value, index) pairs in
   registers, sorted, a new distance inserted by masked shifts; the
   query's K nearest are among those LANES * K pairs (each lane sees its keys
   in ascending index order, so strict < keeps the lower index of a tie), and a
   K-step merge of the lanes' sorted lists picks them. */
template <int R, int D, int K>
static void topk_lanes_tile(const float *q, int64_t qs, const float *pk, int d_rt, int64_t nb, int64_t M,
                            int64_t *out, int64_t os)
{
    const int d = D > 0 ? D : d_rt;
    const int64_t stride = (int64_t)(d + 1) * SKDKVB_LANES;
    vf bv[R][K];
    vi bi[R][K];
    vi cur;
    for (int l = 0; l < SKDKVB_LANES; l++) cur[l] = l;
    for (int s = 0; s < R; s++)
        for (int j = 0; j < K; j++) { bv[s][j] = (vf){} + INFINITY; bi[s][j] = (vi){} - 1; }
    for (int64_t b = 0; b < nb; b++) {
        vf acc[R];
        block_distances<R, D>(pk + b * stride, q, qs, d, acc);
        for (int s = 0; s < R; s++) {
            /* Insert after every pair not farther (lists stay sorted, and a tie keeps
               the earlier, lower index first): m[j] says the new pair goes at or
               above slot j; the masks only grow with j. */
            const vf v = acc[s];
            vi m[K];
            for (int j = 0; j < K; j++) m[j] = v < bv[s][j];
            for (int j = K - 1; j > 0; j--) {
                bv[s][j] = m[j] ? (m[j - 1] ? bv[s][j - 1] : v) : bv[s][j];
                bi[s][j] = m[j] ? (m[j - 1] ? bi[s][j - 1] : cur) : bi[s][j];
            }
            bv[s][0] = m[0] ? v : bv[s][0];
            bi[s][0] = m[0] ? cur : bi[s][0];
        }
        cur += SKDKVB_LANES;
    }
    for (int s = 0; s < R; s++) {
        int head[SKDKVB_LANES] = {0};
        int64_t sel[K];
        for (int j = 0; j < K; j++) {
            int best = -1;
            float v = INFINITY;
            int32_t vi_ = 0;
            for (int l = 0; l < SKDKVB_LANES; l++) {
                if (head[l] >= K) continue;
                const float x = bv[s][head[l]][l];
                const int32_t xi = bi[s][head[l]][l];
                if (xi < 0) continue; /* an unset slot: nothing finite left in this lane */
                if (best < 0 || x < v || (x == v && xi < vi_)) { best = l; v = x; vi_ = xi; }
            }
            if (best < 0) {
                sel[j] = -1;
            } else {
                sel[j] = vi_;
                head[best]++;
            }
        }
        topk_fill(sel, K, M);
        for (int j = 0; j < K; j++) out[s * os + j] = sel[j];
    }
}

template <int D, int K>
static void topk_lanes_head(const float *q, int64_t qs, const float *pk, int d, int64_t nb, int64_t M, int64_t *out,
                            int64_t os, int64_t i0, int64_t i1)
{
    /* R queries x 2K vectors (+ R accumulators) within the 32 registers of AVX-512 */
    constexpr int R = K <= 2 ? 6 : K <= 4 ? 3 : 1;
    int64_t i = i0;
    for (; i + R <= i1; i += R) topk_lanes_tile<R, D, K>(q + i * qs, qs, pk, d, nb, M, out + i * os, os);
    for (; i < i1; i++) topk_lanes_tile<1, D, K>(q + i * qs, qs, pk, d, nb, M, out + i * os, os);
}

template <int D>
static bool topk_small(const float *q, int64_t qs, const float *pk, int d, int64_t nb, int64_t M, int k, int64_t *out,
                       int64_t os, int64_t i0, int64_t i1)
{
    switch (k) {
    case 2: topk_lanes_head<D, 2>(q, qs, pk, d, nb, M, out, os, i0, i1); return true;
    case 3: topk_lanes_head<D, 3>(q, qs, pk, d, nb, M, out, os, i0, i1); return true;
    case 4: topk_lanes_head<D, 4>(q, qs, pk, d, nb, M, out, os, i0, i1); return true;
    case 8: topk_lanes_head<D, 8>(q, qs, pk, d, nb, M, out, os, i0, i1); return true;
    default: return false;
    }
}

#define TOPK_ROWS 8

template <int D>
static void topk_head(const float *q, int64_t qs, const float *pk, int d, int64_t nb, int64_t M, int k, float *bv,
                      int64_t *bi, int64_t *out, int64_t os, int64_t i0, int64_t i1)
{
    int64_t i = i0;
    for (; i + TOPK_ROWS <= i1; i += TOPK_ROWS)
        topk_tile<TOPK_ROWS, D>(q + i * qs, qs, pk, d, nb, M, k, bv, bi, out + i * os, os);
    for (; i < i1; i++) topk_tile<1, D>(q + i * qs, qs, pk, d, nb, M, k, bv, bi, out + i * os, os);
}

/* As skdkvb_nearest, for the k nearest keys: out (n, C, k), nearest first.
   Returns 0, or -1 when a buffer cannot be allocated. */
extern "C" int skdkvb_nearest_topk(const float *q, int64_t C, int d, const float *keys, const float *bias,
                                   int64_t M, int64_t *out, int k, int64_t c0, int64_t c1, int64_t i0, int64_t i1)
{
    const int64_t nb = (M + SKDKVB_LANES - 1) / SKDKVB_LANES;
    const size_t bytes = (size_t)nb * (size_t)(d + 1) * SKDKVB_LANES * sizeof(float);
    float *pk = (float *)aligned_alloc(64, (bytes + 63) / 64 * 64);
    float *bv = (float *)malloc(sizeof(float) * TOPK_ROWS * (size_t)k);
    int64_t *bi = (int64_t *)malloc(sizeof(int64_t) * TOPK_ROWS * (size_t)k);
    if (pk == NULL || bv == NULL || bi == NULL) {
        free(pk);
        free(bv);
        free(bi);
        return -1;
    }
    for (int64_t c = c0; c < c1; c++) {
        if (d == 14)
            pack_head<14>(keys + c * M * d, bias + c * M, M, d, pk);
        else
            pack_head<0>(keys + c * M * d, bias + c * M, M, d, pk);
        const float *qc = q + c * d;
        int64_t *oc = out + c * k;
        if (d == 14 ? topk_small<14>(qc, C * d, pk, d, nb, M, k, oc, C * k, i0, i1)
                    : topk_small<0>(qc, C * d, pk, d, nb, M, k, oc, C * k, i0, i1))
            continue;
        if (d == 14)
            topk_head<14>(qc, C * d, pk, d, nb, M, k, bv, bi, oc, C * k, i0, i1);
        else
            topk_head<0>(qc, C * d, pk, d, nb, M, k, bv, bi, oc, C * k, i0, i1);
    }
    free(pk);
    free(bv);
    free(bi);
    return 0;
}

#include "search_lp.h"
