/* Low-precision nearest-key search (int8 or int16 VNNI) whose selected keys
   are bit-identical to the float32 kernel of search.cpp. Included at the end
   of search.cpp: it reuses pack_head, head_rows, reduce_lanes and fp32_head,
   so that the float32 re-check below runs the very same arithmetic.

   Per head (queries [i0, i1)):
   1. Keys are centred per dimension (c = mid-range of the selectable keys),
      scaled per dimension (s_j = max |k_j - c_j| / Q, Q = 127 for int8,
      1023 for int16) and rounded to k^ (int8: stored + 128 as unsigned
      bytes, the operand vpdpbusd wants; int16: pairs for vpdpwssd).
      Centring is free: ||q-k||^2 does not depend on it, and the term
      -2 c.k it moves into the bias is computed once per key in double.
   2. A query becomes x_j = (q_j - c_j) s_j, scaled by a per-query step t
      (a level of a geometric ladder t_max / sqrt(2)^e, so that the per-key
      additive term can be tabulated once per level) and rounded to q^.
      Then -2 (q-c).(k-c) = -2 t sum_j q^_j k^_j up to a rigorous error
      bound, and the approximate score of key m (larger = nearer) is the
      exact int32  I_m = B_e[m] + sum_j q^_j k^_mj (+ a per-query constant
      for the +128 of int8), B_e[m] = round(-(bias_m - 2 c.k_m) / (2 t_e)).
   3. Threshold: with |exact - approx| <= E per key (rounding of keys and
      query, rounding of B, and the float32 rounding of the float32 kernel
      itself), the float32 winner m* satisfies I_m* >= max I - tau,
      tau = E / t_e (see lp_prepare_query). The query's rounding error dq
      enters each key's score as dq.(k^ + dk): after moving the part that is
      the same for every key out, it is at most ||dq / s|| ||k_m - q||, and
      the two keys that matter (the best approximate one and m*) are near
      the query, their distance bounded through the best score (lp_tau);
      the worst case Q sum |dq_j| per key stays as a cap. On Fashion-MNIST
      this cuts the re-checked blocks about 3x.
   4. Pass 1 (int8: 4 vpdpbusd per 16 keys for d <= 16; int16: 7 vpdpwssd
      for d = 14), key chunk by key chunk (L1-sized) for 64 queries at a
      time, keeps each query's lane-wise maximum and shortlists every group
      of 8 blocks whose scores reach the running threshold (refreshed at
      the end of each key chunk; the final threshold can only be higher, so
      a group left out would fail it too); the lane-wise maxima of the
      group's 4 pairs of blocks are kept with it, so pass 2 recomputes only
      the pairs that reach the final threshold.
   5. Pass 2 recomputes the shortlisted blocks' integer scores, compares them
      with the final threshold, and re-computes the blocks that reach it in
      float32 with the float32 kernel's arithmetic (same packed keys, same
      operation order), folding them with the same per-lane rule (strict <,
      so the lowest index wins a tie) and the same lane reduction. The
      candidate set contains m* and only real keys, so the result is m*:
      bit-identical by construction.
   Anything outside the bound's assumptions (non-finite inputs, NaN or -inf
   bias, no selectable key, values so large that float32 could overflow, a
   bias too large for int32) sends that query or head to the float32 kernel.
*/
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__)
#define SKDKVB_HAVE_LP 1
#else
#define SKDKVB_HAVE_LP 0
#endif

/* Whether the int8 path is compiled in and the CPU running it has VNNI. */
extern "C" int skdkvb_lp_available(void)
{
#if SKDKVB_HAVE_LP && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

#if SKDKVB_HAVE_LP
#define LP_LEVELS 8
/* tuning (measured on Zen 5; -D overrides for experiments) */
#ifndef LP_GROUP
#define LP_GROUP 8 /* blocks per shortlist test in pass 1 */
#endif
#ifndef LP_ILP
#define LP_ILP 4 /* blocks re-checked in float32 side by side */
#endif
#define LP_PAIRS (LP_GROUP / 2) /* pass 1 keeps one lane-wise maximum per pair of blocks */
#ifndef LP_TILE
#define LP_TILE 8 /* queries per pass-1 register tile */
#endif
#ifndef LP_QGROUP
#define LP_QGROUP 64 /* queries that stream past one L1-resident key chunk */
#endif
#ifndef LP_KC8
#define LP_KC8 64 /* blocks per key chunk, int8 */
#endif
#ifndef LP_KC16
#define LP_KC16 32 /* blocks per key chunk, int16 */
#endif
/* Fewer queries per head than this: the per-head preparation (tables of
   LP_LEVELS * M entries) would not pay for itself; use float32. */
#define LP_MIN_ROWS 32
#define LP_SENTINEL (-(1 << 30))
#define LP_BMAX 536870912.0 /* 2^29: |B| bound keeping every score inside int32 */
#define LP_TAUMAX 268435456.0

static inline double dmax(double a, double b) { return a > b ? a : b; }
static inline double dmin(double a, double b) { return a < b ? a : b; }

struct LpQuery {
    int32_t w[8]; /* q^: 16 signed bytes (int8) or 16 int16 (dims >= d are 0) */
    int32_t tau;  /* threshold slack, score units, with the worst-case query term */
    int32_t level;
    int64_t row; /* query index */
    /* distance-aware slack (lp_tau): a0 = the terms that do not depend on the
       keys' distance, qsd = the worst-case query term of one key, w = ||dq / s||,
       tw = t w, two_t = 2 t, kq = offset of the bound on a key's squared
       distance, sef = sqrt of the float32 error */
    double a0, qsd, wd, tw, two_t, kq, sef;
};

/* Threshold slack in score units once the best score so far is I: the
   float32 winner m* satisfies I_m* >= I - lp_tau(I). The query-rounding term
   of a key m is at most w ||k_m - q|| (Cauchy-Schwarz, after moving the
   per-query constant dq.p out); the best key's distance is bounded through
   its score, dist <= two_t (kq - I) / 2... solved for sqrt(dist) = u:
   u^2 <= U + 2 t w u, and m*'s distance exceeds it by at most the float32
   error. Each key's term is also capped by the worst case qsd. I - lp_tau(I)
   does not decrease with I, so a running maximum gives a valid (looser)
   threshold. */
static inline double lp_sqrt(double x) /* no libm call (errno): nothing spills around it */
{
    return _mm_cvtsd_f64(_mm_sqrt_sd(_mm_setzero_pd(), _mm_set_sd(x)));
}

static inline int64_t lp_tau(const LpQuery &lq, int32_t I)
{
    const double U = lq.two_t * (lq.kq - (double)I);
    const double ua = lq.tw + lp_sqrt(lq.tw * lq.tw + (U > 0.0 ? U : 0.0));
    const double qa = dmin(lq.qsd, lq.wd * ua), qm = dmin(lq.qsd, lq.wd * (ua + lq.sef));
    const double tau = (lq.a0 + qa + qm) * (1.0 + 1e-9) + 2.0;
    return tau < (double)lq.tau ? (int64_t)tau + 1 : (int64_t)lq.tau;
}

/* The threshold I - lp_tau(I), clamped to int32. */
static inline int32_t lp_thresh(const LpQuery &lq, int32_t I)
{
    const int64_t t = (int64_t)I - lp_tau(lq, I);
    return (int32_t)(t > INT32_MIN ? t : INT32_MIN);
}

/* One dot-product step: 4 (int8: u8 x s8) or 2 (int16) multiply-adds per lane. */
template <bool I16>
static inline __m512i lp_step_dot(__m512i acc, __m512i k, int32_t w)
{
    return I16 ? _mm512_dpwssd_epi32(acc, k, _mm512_set1_epi32(w)) : _mm512_dpbusd_epi32(acc, k, _mm512_set1_epi32(w));
}

template <bool I16>
static inline __m512i lp_dot(__m512i acc, __m512i k, __m512i q)
{
    return I16 ? _mm512_dpwssd_epi32(acc, k, q) : _mm512_dpbusd_epi32(acc, k, q);
}

/* Bytes of one block of 16 packed keys. */
#define LP_KB(I16) ((I16) ? 512 : 256)

/* Running state of one query across key chunks. */
struct alignas(64) LpState {
    int32_t best[16]; /* lane-wise maximum score so far */
    int32_t thr;      /* running threshold: max so far - tau */
    int32_t pad;
    int64_t cnt;      /* shortlisted groups so far */
};

/* Pass 1 for R queries over blocks [b0, b1) (a chunk that stays in L1 while
   every query of the group streams past): I = B_level + dot(keys, q^) for every
   block, its lane-wise maximum, and the shortlist: a group of LP_GROUP blocks
   is appended to the query's list unless all its scores are below the running
   threshold of the previous chunks (the final threshold can only be higher,
   so such a group would fail it too); the lane-wise maxima of its pairs of
   blocks go with it, for pass 2. Blocks are taken two at a time (two
   independent chains per query). btab is laid out [block][level][16]; lists
   has room for nb entries per query. */
template <int R, bool I16, int NW, bool SAME = false>
static void lp_pass1(const LpQuery *qs, const uint8_t *pk8, const int32_t *btab, int64_t nb, int64_t b0_, int64_t b1_,
                     int32_t *lists, int32_t *gms, LpState *st)
{
    /* the running maxima and thresholds stay in st (touched once per group):
       the registers go to the accumulators and the query words */
    const int32_t *bs[R];
    int64_t cnt[R];
    for (int s = 0; s < R; s++) {
        bs[s] = btab + qs[s].level * 16;
        cnt[s] = st[s].cnt;
    }
    for (int64_t b0 = b0_; b0 < b1_; b0 += LP_GROUP) {
        __m512i gmax[R];
        int32_t *slot[R]; /* the query's next free slot: the lane-wise maxima of the group's pairs of blocks */
        for (int s = 0; s < R; s++) {
            gmax[s] = _mm512_set1_epi32(INT32_MIN);
            slot[s] = gms + (s * (nb / LP_GROUP + 1) + cnt[s]) * (LP_PAIRS * 16);
        }
        const int64_t b1 = b0 + LP_GROUP < b1_ ? b0 + LP_GROUP : b1_;
        for (int64_t b = b0; b < b1; b += 2) {
            const int64_t bb = b + 1 < b1 ? b + 1 : b; /* an odd last block pairs with itself */
            const __m512i *ka = (const __m512i *)(pk8 + b * LP_KB(I16));
            const __m512i *kb2 = (const __m512i *)(pk8 + bb * LP_KB(I16));
            __m512i kr[NW], kr2[NW];
            for (int g = 0; g < NW; g++) kr[g] = _mm512_load_si512(ka + g);
            for (int g = 0; g < NW; g++) kr2[g] = _mm512_load_si512(kb2 + g);
            const int64_t bo = b * (LP_LEVELS * 16), bo2 = bb * (LP_LEVELS * 16);
            /* SAME: every query of the tile has the same level, one B line */
            const __m512i b_same = _mm512_load_si512((const __m512i *)(bs[0] + bo));
            const __m512i b_same2 = _mm512_load_si512((const __m512i *)(bs[0] + bo2));
            for (int s = 0; s < R; s++) {
                __m512i acc = SAME ? b_same : _mm512_load_si512((const __m512i *)(bs[s] + bo));
                __m512i acc2 = SAME ? b_same2 : _mm512_load_si512((const __m512i *)(bs[s] + bo2));
                for (int g = 0; g < NW; g++) {
                    const __m512i w = _mm512_set1_epi32(qs[s].w[g]);
                    acc = lp_dot<I16>(acc, kr[g], w);
                    acc2 = lp_dot<I16>(acc2, kr2[g], w);
                }
                const __m512i pm = _mm512_max_epi32(acc, acc2);
                _mm512_store_si512((__m512i *)(slot[s] + ((b - b0) / 2) * 16), pm);
                gmax[s] = _mm512_max_epi32(gmax[s], pm);
            }
        }
        for (int s = 0; s < R; s++) {
            _mm512_store_si512((__m512i *)st[s].best,
                               _mm512_max_epi32(_mm512_load_si512((const __m512i *)st[s].best), gmax[s]));
            /* branch-free: the slot is kept when any lane reaches thr */
            lists[s * nb + cnt[s]] = (int32_t)b0;
            cnt[s] += _mm512_cmpge_epi32_mask(gmax[s], _mm512_set1_epi32(st[s].thr)) != 0;
        }
    }
    for (int s = 0; s < R; s++) {
        st[s].thr = lp_thresh(qs[s], _mm512_reduce_max_epi32(_mm512_load_si512((const __m512i *)st[s].best)));
        st[s].cnt = cnt[s];
    }
}

/* Float32 re-check of the U blocks bl[0..U), each exactly as tile<1, D>
   computes it, side by side (independent chains), folded in increasing block
   order with its rule (strict <). */
template <int D, int U>
static inline void lp_recheck(const float *pk, int64_t stride, int d_rt, const float *qrow, const int32_t *bl, vi lane,
                              vf &best, vi &bidx)
{
    const int d = D > 0 ? D : d_rt;
    vf f[U];
    for (int u = 0; u < U; u++) f[u] = *(const vf *)(pk + bl[u] * stride + d * SKDKVB_LANES);
    for (int j = 0; j < d; j++)
        for (int u = 0; u < U; u++) f[u] += *(const vf *)(pk + bl[u] * stride + j * SKDKVB_LANES) * qrow[j];
    for (int u = 0; u < U; u++) {
        const vi lt = f[u] < best;
        best = lt ? f[u] : best;
        bidx = lt ? lane + (int32_t)(bl[u] * SKDKVB_LANES) : bidx;
    }
}

/* Pass 2 for one query: the shortlisted blocks' int8 scores are recomputed and
   compared with the final threshold; blocks that reach it are re-computed in
   float32 exactly as tile<1, D> does, and folded with its rule. */
template <int D, bool I16, int NW>
__attribute__((noinline)) static int64_t lp_pass2(const LpQuery &lq, const float *qrow, const float *pk, const uint8_t *pk8,
                        const int32_t *btab, int d_rt, int64_t nb, const int32_t *list, const int32_t *gms,
                        int64_t n_list, int32_t thresh, int64_t *n_blocks)
{
    const int d = D > 0 ? D : d_rt;
    const int64_t stride = (int64_t)(d + 1) * SKDKVB_LANES;
    const __m512i tv = _mm512_set1_epi32(thresh);
    const int32_t *bs = btab + lq.level * 16;
    vf best = (vf){} + INFINITY;
    vi bidx = (vi){};
    vi lane;
    for (int l = 0; l < SKDKVB_LANES; l++) lane[l] = l;
    /* the pairs of blocks (of the shortlisted groups) whose lane-wise maximum
       reaches the final threshold, then their blocks whose recomputed integer
       scores reach it, all listed branch-free: a data-dependent branch here
       mispredicts about once per passing pair, and that cost more than the
       recomputation itself */
    int32_t blist[LP_GROUP * 64], plist[64 * LP_PAIRS];
    int64_t cnt = 0, t = 0;
    while (t < n_list) {
        int64_t m = 0; /* up to 63 groups' pairs at a time (blist's size) */
        for (; t < n_list && m < 64 * LP_PAIRS - LP_PAIRS; t++) {
            const int32_t *gv = gms + t * (LP_PAIRS * 16);
            for (int k = 0; k < LP_PAIRS; k++) {
                const int64_t p0 = list[t] + 2 * k;
                plist[m] = (int32_t)p0;
                m += (p0 < nb) & (_mm512_cmpge_epi32_mask(_mm512_load_si512((const __m512i *)(gv + k * 16)), tv) != 0);
            }
        }
        for (int64_t r = 0; r < m; r++)
            for (int u = 0; u < 2; u++) {
                const int64_t b = plist[r] + u < nb ? plist[r] + u : nb - 1; /* a repeated block is harmless */
                const __m512i *kb = (const __m512i *)(pk8 + b * LP_KB(I16));
                __m512i acc = _mm512_load_si512((const __m512i *)(bs + b * (LP_LEVELS * 16)));
                for (int g = 0; g < NW; g++) acc = lp_step_dot<I16>(acc, _mm512_load_si512(kb + g), lq.w[g]);
                blist[cnt] = (int32_t)b;
                cnt += _mm512_cmpge_epi32_mask(acc, tv) != 0;
            }
        /* float32 re-check, LP_ILP blocks at a time, then 2, then 1 */
        int64_t r = 0;
        for (; r + LP_ILP <= cnt; r += LP_ILP) lp_recheck<D, LP_ILP>(pk, stride, d, qrow, blist + r, lane, best, bidx);
        for (; r + 2 <= cnt; r += 2) lp_recheck<D, 2>(pk, stride, d, qrow, blist + r, lane, best, bidx);
        if (r < cnt) lp_recheck<D, 1>(pk, stride, d, qrow, blist + r, lane, best, bidx);
        *n_blocks += cnt;
        cnt = 0;
    }
    return reduce_lanes(best, bidx);
}

/* Per-head state of the int8 path. */
struct LpHead {
    double c[16], s[16], eps[16], inv_s[16];
    double dmax; /* max over selectable keys of ||k||^2 - bias (double) */
    double t_max, e_f_bias, e_f_key, e_beta;
    double qmax; /* largest quantised magnitude: 127 (int8) or 1023 (int16) */
    bool i16;
    double steps[LP_LEVELS];
    int usable; /* levels 0..usable-1 have every |B| within LP_BMAX */
};

/* Ladder of query steps: level e uses t_max / sqrt(2)^e. */
static inline double lp_step(double t_max, int e) { return ldexp(t_max, -e / 2) * (e % 2 ? 0.70710678118654752 : 1.0); }

/* Quantise the queries rows[0..nr) (nr <= 8, d floats each, row k at
   q0 + k * qs) for head h, one query per lane of 8 doubles. Returns the mask
   of the queries that can take the integer path (the others go to the
   float32 kernel: non-finite values, magnitudes where float32 could
   overflow, a slack beyond int32). */
__attribute__((noinline)) static unsigned lp_prepare_queries(const LpHead &h, const float *q0, int64_t qs, int nr, int d,
                                                             LpQuery *lq)
{
    const __mmask8 live = (__mmask8)((1u << nr) - 1u);
    const __m512i idx = _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(qs));
    const __m512d zero = _mm512_setzero_pd(), qm = _mm512_set1_pd(h.qmax);
    __m512d qd[16], xd[16];
    __m512d sum_abs = zero, xmax = zero;
    __mmask8 ok = live;
    for (int j = 0; j < d; j++) {
        const __m256 f = _mm512_mask_i64gather_ps(_mm256_setzero_ps(), live, idx, q0 + j, 4);
        qd[j] = _mm512_cvtps_pd(f);
        ok &= _mm512_cmp_pd_mask(_mm512_sub_pd(qd[j], qd[j]), zero, _CMP_EQ_OQ); /* inf, NaN */
        sum_abs = _mm512_add_pd(sum_abs, _mm512_abs_pd(qd[j]));
        xd[j] = _mm512_mul_pd(_mm512_sub_pd(qd[j], _mm512_set1_pd(h.c[j])), _mm512_set1_pd(h.s[j]));
        xmax = _mm512_max_pd(xmax, _mm512_abs_pd(xd[j]));
    }
    /* float32 error of the float32 kernel's own distances (d fused or 2d
       separate roundings of terms bounded by |bias| + 2 sum |k_j q_j|), plus
       underflow */
    const __m512d mag = _mm512_fmadd_pd(_mm512_set1_pd(2.0 * h.e_f_key), sum_abs, _mm512_set1_pd(h.e_f_bias));
    ok &= _mm512_cmp_pd_mask(mag, _mm512_set1_pd(1e36), _CMP_LT_OQ);
    const __m512d e_f = _mm512_fmadd_pd(_mm512_set1_pd(2.0 * (d + 1) * 0x1p-24 * 1.01), mag,
                                        _mm512_set1_pd((2 * d + 2) * 0x1p-149));
    /* the finest step of the ladder that is still >= tq (steps decrease with the level) */
    const __m512d tq = _mm512_div_pd(xmax, qm);
    __m512i cntv = _mm512_setzero_si512();
    for (int e = 0; e < h.usable; e++)
        cntv = _mm512_mask_add_epi64(cntv, _mm512_cmp_pd_mask(_mm512_set1_pd(h.steps[e]), tq, _CMP_GE_OQ), cntv,
                                     _mm512_set1_epi64(1));
    ok &= _mm512_cmpgt_epi64_mask(cntv, _mm512_setzero_si512());
    const __m512i lev = _mm512_max_epi64(_mm512_sub_epi64(cntv, _mm512_set1_epi64(1)), _mm512_setzero_si512());
    const __m512d t = _mm512_permutexvar_pd(lev, _mm512_loadu_pd(h.steps));
    ok &= _mm512_cmp_pd_mask(t, zero, _CMP_GT_OQ) & _mm512_cmp_pd_mask(t, tq, _CMP_GE_OQ);
    const __m512d it = _mm512_div_pd(_mm512_set1_pd(1.0), t);
    /* exact: (q-c).(k-c) = t sum_j (q^_j + dq_j)(k^_j + dk_j) with |dk_j| <= eps_j and
       |k^_j + dk_j| <= Q (127 or 1023), so the error of t sum q^ k^ is at most
       t (sum |q^_j| eps_j + Q sum |dq_j|); B adds 1/2 unit of rounding. In score units
       (distance / 2t): tau = 2 (1/2 + that) + (float32 error + double error) / t. The
       rounding of y = x / t (by the reciprocal) is covered by the slack added to tau.
       Distance-aware slack (lp_tau): with p_j = (q_j - c_j) / s_j, the query term
       dq.kx_m = dq.p + sum_j (dq_j / s_j)(k_mj - q_j); the first part is the same for
       every key, the second is at most w ||k_m - q||, w = ||dq / s||. A key's squared
       distance ||q - k_m||^2 = bias_m - 2 q.k_m + ||q||^2 - (bias_m - ||k_m||^2) is at
       most 2t (kq - I_m) + 2t w ||q - k_m||, with I_m the integer score and kq the
       per-query constants below (score units). */
    __m512d g = zero, qsd = zero, w2 = zero, qq = zero, cq = zero, dqp = zero, sv = zero, mag_k = zero;
    int32_t vb[16][8];
    for (int j = 0; j < d; j++) {
        const __m512d y = _mm512_mul_pd(xd[j], it);
        const __m512d v = _mm512_min_pd(qm, _mm512_max_pd(_mm512_sub_pd(zero, qm), _mm512_roundscale_pd(y, _MM_FROUND_TO_NEAREST_INT)));
        const __m512d dq = _mm512_sub_pd(y, v), cj = _mm512_set1_pd(h.c[j]), isj = _mm512_set1_pd(h.inv_s[j]);
        const __m512d qc = _mm512_sub_pd(qd[j], cj), dqs = _mm512_mul_pd(dq, isj), cqc = _mm512_mul_pd(cj, qc);
        const __m512d dqpj = _mm512_mul_pd(dqs, qc);
        g = _mm512_fmadd_pd(_mm512_abs_pd(v), _mm512_set1_pd(h.eps[j]), g);
        qsd = _mm512_add_pd(qsd, _mm512_abs_pd(dq));
        w2 = _mm512_fmadd_pd(dqs, dqs, w2);
        qq = _mm512_fmadd_pd(qd[j], qd[j], qq);
        cq = _mm512_add_pd(cq, cqc);
        dqp = _mm512_add_pd(dqp, dqpj);
        sv = _mm512_add_pd(sv, v);
        mag_k = _mm512_add_pd(mag_k, _mm512_add_pd(_mm512_abs_pd(cqc), _mm512_abs_pd(dqpj)));
        _mm256_storeu_si256((__m256i *)vb[j], _mm512_cvtpd_epi32(v));
    }
    /* the sums' own rounding (relative 2^-50) is far below the slack */
    const __m512d one = _mm512_set1_pd(1.0), half = _mm512_set1_pd(0.5), two = _mm512_set1_pd(2.0);
    const __m512d err = _mm512_add_pd(_mm512_add_pd(half, g), _mm512_mul_pd(qm, qsd));
    const __m512d efb = _mm512_add_pd(e_f, _mm512_set1_pd(h.e_beta));
    const __m512d tau = _mm512_add_pd(
        _mm512_mul_pd(_mm512_add_pd(_mm512_mul_pd(two, err), _mm512_div_pd(efb, t)), _mm512_set1_pd(1.0 + 1e-9)), two);
    ok &= _mm512_cmp_pd_mask(tau, _mm512_set1_pd(LP_TAUMAX), _CMP_LT_OQ);
    const __m512d a0 = _mm512_add_pd(_mm512_mul_pd(two, _mm512_add_pd(half, g)), _mm512_div_pd(efb, t));
    const __m512d wd = _mm512_mul_pd(_mm512_sqrt_pd(w2), _mm512_set1_pd(1.0 + 1e-12));
    const __m512d two_t = _mm512_mul_pd(two, t);
    /* distance units: ||q||^2 - 2 c.(q - c) - 2t dq.p + 2t (1/2 + g) + max_m (||k_m||^2 - bias_m)
       + the rounding of beta; then the slack for this sum's own rounding */
    __m512d kd = _mm512_sub_pd(qq, _mm512_mul_pd(two, cq));
    kd = _mm512_sub_pd(kd, _mm512_mul_pd(two_t, dqp));
    kd = _mm512_fmadd_pd(two_t, _mm512_add_pd(half, g), kd);
    kd = _mm512_add_pd(kd, _mm512_set1_pd(h.dmax + h.e_beta));
    const __m512d slack = _mm512_add_pd(qq, _mm512_add_pd(_mm512_mul_pd(_mm512_mul_pd(two, mag_k), _mm512_add_pd(one, _mm512_mul_pd(two, t))),
                                                          _mm512_set1_pd(fabs(h.dmax))));
    kd = _mm512_fmadd_pd(_mm512_set1_pd(1e-12), slack, kd);
    const __m512d off = h.i16 ? zero : _mm512_mul_pd(_mm512_set1_pd(128.0), sv); /* int8 scores carry 128 sum q^ */
    const __m512d kq = _mm512_add_pd(_mm512_add_pd(_mm512_div_pd(kd, two_t), off), _mm512_set1_pd(1e-6));
    double A0[8], QSD[8], WD[8], TW[8], TT[8], KQ[8], SEF[8], TAU[8];
    int64_t LEV[8];
    _mm512_storeu_pd(A0, a0);
    _mm512_storeu_pd(QSD, _mm512_mul_pd(qm, qsd));
    _mm512_storeu_pd(WD, wd);
    _mm512_storeu_pd(TW, _mm512_mul_pd(t, wd));
    _mm512_storeu_pd(TT, two_t);
    _mm512_storeu_pd(KQ, kq);
    _mm512_storeu_pd(SEF, _mm512_sqrt_pd(e_f));
    _mm512_storeu_pd(TAU, _mm512_roundscale_pd(tau, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
    _mm512_storeu_si512(LEV, lev);
    for (int k = 0; k < nr; k++) {
        if (!((ok >> k) & 1)) continue;
        LpQuery &x = lq[k];
        memset(x.w, 0, sizeof x.w);
        for (int j = 0; j < d; j++) {
            if (h.i16)
                ((int16_t *)x.w)[j] = (int16_t)vb[j][k];
            else
                ((int8_t *)x.w)[j] = (int8_t)vb[j][k];
        }
        x.tau = (int32_t)TAU[k];
        x.level = (int32_t)LEV[k];
        x.a0 = A0[k];
        x.qsd = QSD[k];
        x.wd = WD[k];
        x.tw = TW[k];
        x.two_t = TT[k];
        x.kq = KQ[k];
        x.sef = SEF[k];
    }
    return ok;
}

/* Prepare a head from its float32 packing pk (blocks of 16 keys: d rows of
   -2 k, then the bias row; padding keys carry +inf): quantised keys into pk8
   and beta (bias - 2 c.k, double; +inf for pruned keys). Vectorised over the
   16 keys of a block. Returns 0, or -1 when the head must go to the float32
   kernel entirely. */
__attribute__((noinline)) static int lp_prepare_head(const float *pk, int64_t nb, int d, LpHead &h, uint8_t *pk8,
                                                     double *beta)
{
    const int64_t stride = (int64_t)(d + 1) * 16;
    const __m512 inf = _mm512_set1_ps(INFINITY), zero = _mm512_setzero_ps(), mhalf = _mm512_set1_ps(-0.5f);
    __m512 lo[16], hi[16];
    for (int j = 0; j < 16; j++) { lo[j] = inf; hi[j] = -inf; }
    __m512 vmaxk = zero, vmaxb = zero;
    __mmask16 any_valid = 0;
    for (int64_t b = 0; b < nb; b++) {
        const float *blk = pk + b * stride;
        const __m512 bv = _mm512_load_ps(blk + d * 16);
        const __mmask16 pruned = _mm512_cmp_ps_mask(bv, inf, _CMP_EQ_OQ);
        const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_sub_ps(bv, bv), zero, _CMP_EQ_OQ);
        if ((__mmask16)(~pruned & ~finite)) return -1; /* NaN or -inf bias */
        const __mmask16 valid = (__mmask16)~pruned;
        any_valid |= valid;
        vmaxb = _mm512_mask_max_ps(vmaxb, valid, vmaxb, _mm512_abs_ps(bv));
        for (int j = 0; j < d; j++) {
            const __m512 kv = _mm512_mul_ps(_mm512_load_ps(blk + j * 16), mhalf); /* exact: k */
            if ((__mmask16)(valid & ~_mm512_cmp_ps_mask(_mm512_sub_ps(kv, kv), zero, _CMP_EQ_OQ))) return -1;
            lo[j] = _mm512_mask_min_ps(lo[j], valid, lo[j], kv);
            hi[j] = _mm512_mask_max_ps(hi[j], valid, hi[j], kv);
            vmaxk = _mm512_mask_max_ps(vmaxk, valid, vmaxk, _mm512_abs_ps(kv));
        }
    }
    const double max_key = _mm512_reduce_max_ps(vmaxk), max_bias = _mm512_reduce_max_ps(vmaxb);
    /* beyond these, float32 distances of the float32 kernel may overflow */
    if (!any_valid || !(max_key < 1e18) || !(max_bias < 1e36)) return -1;
    h.e_f_bias = max_bias;
    h.e_f_key = max_key;
    double inv_s[16];
    for (int j = 0; j < 16; j++) { h.c[j] = 0.0; h.s[j] = 0.0; h.eps[j] = 0.0; inv_s[j] = 0.0; }
    for (int j = 0; j < d; j++) {
        const double l = _mm512_reduce_min_ps(lo[j]), u = _mm512_reduce_max_ps(hi[j]);
        h.c[j] = 0.5 * (l + u);
        h.s[j] = dmax(u - h.c[j], h.c[j] - l) / h.qmax;
        inv_s[j] = h.s[j] > 0.0 ? 1.0 / h.s[j] : 0.0;
    }
    const __m512d qm = _mm512_set1_pd(h.qmax), dinf = _mm512_set1_pd(INFINITY);
    __m512d eps0[16], eps1[16], vterms = _mm512_setzero_pd();
    __m512d vdmax = _mm512_set1_pd(-INFINITY), vnrm = _mm512_setzero_pd();
    for (int j = 0; j < 16; j++) { eps0[j] = _mm512_setzero_pd(); eps1[j] = _mm512_setzero_pd(); }
    const int nw = h.i16 ? 8 : 4;
    for (int64_t b = 0; b < nb; b++) {
        const float *blk = pk + b * stride;
        const __m512 bv = _mm512_load_ps(blk + d * 16);
        const __mmask16 valid = (__mmask16)~_mm512_cmp_ps_mask(bv, inf, _CMP_EQ_OQ);
        const __mmask8 v0 = (__mmask8)valid, v1 = (__mmask8)(valid >> 8);
        const __m512d b0 = _mm512_cvtps_pd(_mm512_castps512_ps256(bv)), b1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(bv, 1));
        __m512d dot0 = _mm512_setzero_pd(), dot1 = _mm512_setzero_pd();
        __m512d nrm0 = _mm512_setzero_pd(), nrm1 = _mm512_setzero_pd();
        __m512d t0 = _mm512_abs_pd(b0), t1 = _mm512_abs_pd(b1);
        __m512i words[8];
        for (int g = 0; g < 8; g++) words[g] = _mm512_set1_epi32(h.i16 ? 0 : (int32_t)0x80808080u);
        for (int j = 0; j < d; j++) {
            const __m512 kv = _mm512_mul_ps(_mm512_load_ps(blk + j * 16), _mm512_set1_ps(-0.5f));
            const __m512d k0 = _mm512_cvtps_pd(_mm512_castps512_ps256(kv)), k1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(kv, 1));
            const __m512d cj = _mm512_set1_pd(h.c[j]), is = _mm512_set1_pd(inv_s[j]);
            dot0 = _mm512_fmadd_pd(cj, k0, dot0);
            dot1 = _mm512_fmadd_pd(cj, k1, dot1);
            nrm0 = _mm512_fmadd_pd(k0, k0, nrm0);
            nrm1 = _mm512_fmadd_pd(k1, k1, nrm1);
            t0 = _mm512_add_pd(t0, _mm512_abs_pd(_mm512_mul_pd(_mm512_set1_pd(2.0), _mm512_mul_pd(cj, k0))));
            t1 = _mm512_add_pd(t1, _mm512_abs_pd(_mm512_mul_pd(_mm512_set1_pd(2.0), _mm512_mul_pd(cj, k1))));
            /* by the reciprocal: its rounding (2^-52 relative) is covered by tau's slack;
               pruned keys (and s_j = 0) quantise to 0 */
            const __m512d n0 = _mm512_maskz_mul_pd(v0, _mm512_sub_pd(k0, cj), is);
            const __m512d n1 = _mm512_maskz_mul_pd(v1, _mm512_sub_pd(k1, cj), is);
            const __m512d r0 = _mm512_min_pd(qm, _mm512_max_pd(-qm, _mm512_roundscale_pd(n0, _MM_FROUND_TO_NEAREST_INT)));
            const __m512d r1 = _mm512_min_pd(qm, _mm512_max_pd(-qm, _mm512_roundscale_pd(n1, _MM_FROUND_TO_NEAREST_INT)));
            eps0[j] = _mm512_max_pd(eps0[j], _mm512_abs_pd(_mm512_sub_pd(n0, r0)));
            eps1[j] = _mm512_max_pd(eps1[j], _mm512_abs_pd(_mm512_sub_pd(n1, r1)));
            const __m512i ki = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtpd_epi32(r0)), _mm512_cvtpd_epi32(r1), 1);
            if (h.i16) {
                const int sh = 16 * (j % 2);
                words[j / 2] = _mm512_or_si512(_mm512_andnot_si512(_mm512_set1_epi32(0xffff << sh), words[j / 2]),
                                               _mm512_sll_epi32(_mm512_and_si512(ki, _mm512_set1_epi32(0xffff)),
                                                                _mm_cvtsi32_si128(sh)));
            } else {
                const int sh = 8 * (j % 4);
                const __m512i byte = _mm512_and_si512(_mm512_add_epi32(ki, _mm512_set1_epi32(128)), _mm512_set1_epi32(0xff));
                words[j / 4] = _mm512_or_si512(_mm512_andnot_si512(_mm512_set1_epi32((int32_t)(0xffu << sh)), words[j / 4]),
                                               _mm512_sll_epi32(byte, _mm_cvtsi32_si128(sh)));
            }
        }
        for (int g = 0; g < nw; g++) _mm512_store_si512((__m512i *)(pk8 + b * LP_KB(h.i16) + g * 64), words[g]);
        const __m512d two = _mm512_set1_pd(2.0);
        _mm512_storeu_pd(beta + b * 16, _mm512_mask_blend_pd(v0, dinf, _mm512_fnmadd_pd(two, dot0, b0)));
        _mm512_storeu_pd(beta + b * 16 + 8, _mm512_mask_blend_pd(v1, dinf, _mm512_fnmadd_pd(two, dot1, b1)));
        vterms = _mm512_mask_max_pd(vterms, v0, vterms, t0);
        vterms = _mm512_mask_max_pd(vterms, v1, vterms, t1);
        vdmax = _mm512_mask_max_pd(vdmax, v0, vdmax, _mm512_sub_pd(nrm0, b0));
        vdmax = _mm512_mask_max_pd(vdmax, v1, vdmax, _mm512_sub_pd(nrm1, b1));
        vnrm = _mm512_mask_max_pd(vnrm, v0, vnrm, nrm0);
        vnrm = _mm512_mask_max_pd(vnrm, v1, vnrm, nrm1);
    }
    /* ||k||^2 in double: 2^-50 relative at most; the slack covers it */
    h.dmax = _mm512_reduce_max_pd(vdmax) + 1e-14 * _mm512_reduce_max_pd(vnrm);
    for (int j = 0; j < 16; j++) h.inv_s[j] = inv_s[j];
    for (int j = 0; j < d; j++) h.eps[j] = _mm512_reduce_max_pd(_mm512_max_pd(eps0[j], eps1[j]));
    /* rounding of the double sums (beta, x, k^ / s): far below this */
    h.e_beta = 1e-13 * _mm512_reduce_max_pd(vterms);
    return 0;
}

/* Fill the level tables once t_max is known. */
__attribute__((noinline)) static void lp_tables(LpHead &h, const double *beta, int64_t mp, int32_t *btab)
{
    h.usable = 0;
    for (int e = 0; e < LP_LEVELS; e++) h.steps[e] = lp_step(h.t_max, e);
    for (int e = 0; e < LP_LEVELS; e++) {
        /* a multiplication by the reciprocal: its rounding (relative 2^-52 of
           |B| <= 2^29) is covered by the slack added to tau */
        const double r = -0.5 / lp_step(h.t_max, e);
        bool ok = true;
        const __m512d vr = _mm512_set1_pd(r), inf = _mm512_set1_pd(INFINITY), bmax = _mm512_set1_pd(LP_BMAX);
        for (int64_t b = 0; b < mp / 16 && ok; b++) {
            int32_t *slot = btab + b * (LP_LEVELS * 16) + e * 16;
            for (int h8 = 0; h8 < 2; h8++) {
                const __m512d bb = _mm512_loadu_pd(beta + b * 16 + h8 * 8);
                const __m512d v = _mm512_roundscale_pd(_mm512_mul_pd(bb, vr), _MM_FROUND_TO_NEAREST_INT);
                const __mmask8 pruned = _mm512_cmp_pd_mask(bb, inf, _CMP_EQ_OQ); /* +inf: the sentinel */
                const __mmask8 fits = _mm512_cmp_pd_mask(_mm512_abs_pd(v), bmax, _CMP_LE_OQ);
                ok &= (__mmask8)(pruned | fits) == 0xFF;
                const __m256i iv = _mm512_cvtpd_epi32(_mm512_maskz_mov_pd(fits, v));
                _mm256_storeu_si256((__m256i *)(slot + h8 * 8),
                                    _mm256_mask_mov_epi32(iv, pruned, _mm256_set1_epi32(LP_SENTINEL)));
            }
        }
        if (!ok) break; /* finer levels only have larger |B| */
        h.usable = e + 1;
    }
}

/* Run pass 1 (key chunk by key chunk, LP_TILE queries at a time) and pass 2
   for the nq <= LP_QGROUP queries lq[0..nq). */
template <int D, bool I16, int NW>
static void lp_group(const LpQuery *lq, int64_t nq, const float *q, int64_t C, int d, int64_t c, const uint8_t *pk8,
                     const int32_t *btab, const float *pk, int64_t mp, int32_t *lists, int32_t *gms, LpState *st,
                     int64_t *out,
                     int64_t *stats)
{
    const int64_t nb = mp / 16;
    const int64_t kc = I16 ? LP_KC16 : LP_KC8; /* blocks per chunk: keys + used B lines fit L1 */
    const int64_t gstride = (nb / LP_GROUP + 1) * LP_PAIRS * 16;
    for (int64_t s = 0; s < nq; s++) {
        for (int l = 0; l < 16; l++) st[s].best[l] = INT32_MIN;
        st[s].thr = INT32_MIN;
        st[s].cnt = 0;
    }
    for (int64_t c0 = 0; c0 < nb; c0 += kc) {
        const int64_t c1 = c0 + kc < nb ? c0 + kc : nb;
        int64_t t = 0;
        for (; t + LP_TILE <= nq; t += LP_TILE)
            if (lq[t].level == lq[t + LP_TILE - 1].level) /* sorted by level */
                lp_pass1<LP_TILE, I16, NW, true>(lq + t, pk8, btab, nb, c0, c1, lists + t * nb, gms + t * gstride, st + t);
            else
                lp_pass1<LP_TILE, I16, NW>(lq + t, pk8, btab, nb, c0, c1, lists + t * nb, gms + t * gstride, st + t);
        for (; t < nq; t++)
            lp_pass1<1, I16, NW>(lq + t, pk8, btab, nb, c0, c1, lists + t * nb, gms + t * gstride, st + t);
    }
    for (int64_t s = 0; s < nq; s++) {
        const int32_t thr = lp_thresh(lq[s], _mm512_reduce_max_epi32(_mm512_load_si512((const __m512i *)st[s].best)));
        const int64_t i = lq[s].row;
        stats[4] += st[s].cnt;
        out[i * C + c] = lp_pass2<D, I16, NW>(lq[s], q + (i * C + c) * d, pk, pk8, btab, d, nb, lists + s * nb,
                                              gms + s * gstride,
                                              st[s].cnt, (int32_t)thr, &stats[1]);
    }
}
#endif

/* Same contract as skdkvb_nearest (same result, bit for bit), through the
   int8 path where it applies. stats (may be NULL) accumulates: [0] query-heads
   searched in int8, [1] blocks of 16 keys re-checked in float32, [2]
   query-heads sent to float32 (non-finite or extreme values), [3] heads sent to
   float32 whole, [4] blocks shortlisted by pass 1. */
extern "C" int skdkvb_nearest_lp(const float *q, int64_t C, int d, const float *keys, const float *bias, int64_t M,
                                 int64_t *out, int64_t c0, int64_t c1, int64_t i0, int64_t i1, int64_t *stats,
                                 int bits)
{
#if SKDKVB_HAVE_LP
    if (d > 16 || i1 - i0 < LP_MIN_ROWS || !skdkvb_lp_available())
        return skdkvb_nearest(q, C, d, keys, bias, M, out, c0, c1, i0, i1);
    int64_t local[5] = {0, 0, 0, 0, 0};
    const int64_t nb = (M + 15) / 16, mp = nb * 16, n = i1 - i0;
    const size_t pk_bytes = ((size_t)nb * (size_t)(d + 1) * 16 * sizeof(float) + 63) / 64 * 64;
    float *pk = (float *)aligned_alloc(64, pk_bytes);
    const bool i16 = bits == 16;
    uint8_t *pk8 = (uint8_t *)aligned_alloc(64, (size_t)nb * LP_KB(i16));
    int32_t *btab = (int32_t *)aligned_alloc(64, (size_t)LP_LEVELS * mp * 4);
    int32_t *lists = (int32_t *)malloc((size_t)LP_QGROUP * nb * 4);
    int32_t *gms = (int32_t *)aligned_alloc(64, (size_t)LP_QGROUP * (nb / LP_GROUP + 1) * LP_PAIRS * 64);
    LpState *st = (LpState *)aligned_alloc(64, (size_t)LP_QGROUP * sizeof(LpState));
    double *beta = (double *)malloc((size_t)mp * 8);
    LpQuery *lq = (LpQuery *)malloc((size_t)n * sizeof(LpQuery));
    LpQuery *lq_sorted = (LpQuery *)malloc((size_t)n * sizeof(LpQuery));
    int rc = 0;
    if (!pk || !pk8 || !btab || !lists || !gms || !st || !beta || !lq || !lq_sorted) { rc = -1; goto done; }
    for (int64_t c = c0; c < c1; c++) {
        const float *kc = keys + c * M * d, *bc = bias + c * M;
        LpHead h;
        h.i16 = i16;
        h.qmax = i16 ? 1023.0 : 127.0;
        if (d == 14)
            pack_head<14>(kc, bc, M, d, pk);
        else
            pack_head<0>(kc, bc, M, d, pk);
        if (lp_prepare_head(pk, nb, d, h, pk8, beta) != 0) {
            if (d == 14)
                head_rows<14>(q + c * d, C * d, pk, d, nb, out + c, C, i0, i1);
            else
                head_rows<0>(q + c * d, C * d, pk, d, nb, out + c, C, i0, i1);
            local[3]++;
            continue;
        }
        /* t_max over the queries that can use the int8 path */
        h.t_max = 0.0;
        {
            const __mmask16 dm = (__mmask16)((1u << d) - 1u);
            const __m512d hc0 = _mm512_loadu_pd(h.c), hc1 = _mm512_loadu_pd(h.c + 8);
            const __m512d hs0 = _mm512_loadu_pd(h.s), hs1 = _mm512_loadu_pd(h.s + 8);
            __m512d vmax = _mm512_setzero_pd();
            for (int64_t i = i0; i < i1; i++) {
                const __m512 qf = _mm512_maskz_loadu_ps(dm, q + (i * C + c) * d);
                if (_mm512_cmp_ps_mask(_mm512_sub_ps(qf, qf), _mm512_setzero_ps(), _CMP_EQ_OQ) != 0xFFFF) continue;
                const __m512d x0 = _mm512_mul_pd(_mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(qf)), hc0), hs0);
                const __m512d x1 = _mm512_mul_pd(_mm512_sub_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(qf, 1)), hc1), hs1);
                vmax = _mm512_max_pd(vmax, _mm512_max_pd(_mm512_abs_pd(x0), _mm512_abs_pd(x1)));
            }
            h.t_max = _mm512_reduce_max_pd(vmax) / h.qmax;
        }
        if (!(h.t_max > 0.0)) h.t_max = 1.0;
        lp_tables(h, beta, mp, btab);
        int64_t n_lp = 0;
        for (int64_t i = i0; i < i1; i += 8) {
            const int nr = i1 - i < 8 ? (int)(i1 - i) : 8;
            LpQuery batch[8];
            const unsigned ok = h.usable > 0 ? lp_prepare_queries(h, q + (i * C + c) * d, C * d, nr, d, batch) : 0u;
            for (int k = 0; k < nr; k++) {
                if ((ok >> k) & 1) {
                    lq[n_lp] = batch[k];
                    lq[n_lp].row = i + k;
                    n_lp++;
                } else {
                    if (d == 14)
                        head_rows<14>(q + c * d, C * d, pk, d, nb, out + c, C, i + k, i + k + 1);
                    else
                        head_rows<0>(q + c * d, C * d, pk, d, nb, out + c, C, i + k, i + k + 1);
                    local[2]++;
                }
            }
        }
        local[0] += n_lp;
        /* queries sharing a level share the lines of B they read: counting sort by level */
        {
            int64_t start[LP_LEVELS + 1] = {0};
            for (int64_t t = 0; t < n_lp; t++) start[lq[t].level + 1]++;
            for (int e = 0; e < LP_LEVELS; e++) start[e + 1] += start[e];
            for (int64_t t = 0; t < n_lp; t++) lq_sorted[start[lq[t].level]++] = lq[t];
            LpQuery *tmp = lq;
            lq = lq_sorted;
            lq_sorted = tmp;
        }
        for (int64_t t = 0; t < n_lp; t += LP_QGROUP) {
            const int64_t nq = n_lp - t < LP_QGROUP ? n_lp - t : LP_QGROUP;
            if (i16 && d == 14)
                lp_group<14, true, 7>(lq + t, nq, q, C, d, c, pk8, btab, pk, mp, lists, gms, st, out, local);
            else if (i16)
                lp_group<0, true, 8>(lq + t, nq, q, C, d, c, pk8, btab, pk, mp, lists, gms, st, out, local);
            else if (d == 14)
                lp_group<14, false, 4>(lq + t, nq, q, C, d, c, pk8, btab, pk, mp, lists, gms, st, out, local);
            else
                lp_group<0, false, 4>(lq + t, nq, q, C, d, c, pk8, btab, pk, mp, lists, gms, st, out, local);
        }
    }
    if (stats)
        for (int k = 0; k < 5; k++) stats[k] += local[k];
done:
    free(pk); free(pk8); free(btab); free(lists); free(gms); free(st); free(beta); free(lq); free(lq_sorted);
    return rc;
#else
    (void)stats;
    (void)bits;
    return skdkvb_nearest(q, C, d, keys, bias, M, out, c0, c1, i0, i1);
#endif
}
