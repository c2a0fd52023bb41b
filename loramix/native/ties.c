/*
 * TIES' elementwise passes over one block of rows, fused: each runs the
 * operations of loramix.methods.base's eager (torch/numpy) code on a chunk of
 * entries that stays in the L1 cache, instead of one whole-block pass per
 * operation. Same operations, same order, same rounding: the results have
 * the eager code's bits, NaN, infinities and signed zeros included
 * (tests/test_native.py checks every case).
 *
 * Built with -std=c11 -O3 -ffp-contract=off -fno-trapping-math and no
 * fast-math flag: no fused multiply-add, no reassociation, signed zeros kept;
 * -fno-trapping-math only lets a comparison's both sides be evaluated (vector
 * code), which changes no value. The vector clones (target_clones) differ only
 * in the width of the same IEEE operations.
 *
 * count:  above = #{e : |x_e| > hi},  window = [|x_e| : lo <= |x_e| <= hi]
 *         (NaN in neither), as _abs_kth_largest_many counts them.
 * elect:  t_i = hardshrink(x_i, lam_i)  (x where not -lam <= x <= lam, +0
 *         there; lam < 0: t_i = x_i untouched)
 *         g   = t_0 + t_1 + ...  (mass)  or  sign(t_0) + sign(t_1) + ... (count)
 *         g   = g >= 0 ? 1 : -1
 *         y_i = max(t_i g, 0) as clamp_(min=0) (-0 and NaN pass through)
 *         num = ((+0 + y_0) + y_1) + ...,  den = sum_i sign(y_i) [w_i]
 *         den = max(den, 1) (by count)  or  den == 0 ? 1 : den (by weight)
 *         out = num g / den
 *         with sign(v) = (v > 0) - (v < 0): NaN and -0 give +0, as torch.sign.
 * pass:   count of every x_i against its [lo_i, hi_i], and elect with
 *         lam_i = prov_i (the sample's estimate of the threshold, in the
 *         window), in one reading of the blocks; and the records: every
 *         position where some |x_i| is in its band [rlo_i, rhi_i] (around
 *         prov_i, inside the window), with all the x_i there. Where the
 *         threshold turns out to lie in the band, the trim at it and the trim
 *         at prov_i differ only at recorded positions (an entry between the
 *         two is in the band); elsewhere the provisional result is final.
 * fixup:  once the thresholds are known (lam_i just below each), elect again
 *         the records where the trim at lam_i differs from the trim at prov_i
 *         (few: the entries between the estimate and the threshold).
 */
#include <math.h>
#include <stdint.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define AVX512 1
#define AVX512_FN __attribute__((target("avx512f,popcnt")))
#define AVX2 1
#define AVX2_FN __attribute__((target("avx2,popcnt")))
#endif

#define CHUNK 256
#define MAX_ADAPTERS 64 /* loramix.native.ties.MAX_ADAPTERS */
#define SUB 32 /* entries looked at one by one when a window entry is among them */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(LORAMIX_ONE_FORM)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* the election of entries e0 .. e0 + c - 1 of the xs (lam[i]: adapter i's lambda) */
#define ELECT_CHUNK(T, lam)                                                                      \
    for (int i = 0; i < n; i++) {                                                                \
        const T *x = xs[i] + e0;                                                                 \
        T l = lam[i];                                                                            \
        for (int j = 0; j < c; j++) {                                                            \
            T t = ((x[j] >= -l) & (x[j] <= l)) ? (T)0 : x[j];                                    \
            T s = mass ? t : (T)((t > 0) - (t < 0));                                             \
            g[j] = i ? g[j] + s : s;                                                             \
        }                                                                                        \
    }                                                                                            \
    for (int j = 0; j < c; j++) {                                                                \
        g[j] = g[j] >= 0 ? (T)1 : (T)-1;                                                         \
        num[j] = 0;                                                                              \
        den[j] = 0;                                                                              \
    }                                                                                            \
    for (int i = 0; i < n; i++) {                                                                \
        const T *x = xs[i] + e0;                                                                 \
        T l = lam[i], wi = w[i];                                                                 \
        for (int j = 0; j < c; j++) {                                                            \
            T t = ((x[j] >= -l) & (x[j] <= l)) ? (T)0 : x[j];                                    \
            T y = t * g[j];                                                                      \
            y = y < 0 ? (T)0 : y;                                                                \
            num[j] = num[j] + y;                                                                 \
            T s = (T)((y > 0) - (y < 0));                                                        \
            den[j] = by_count ? den[j] + s : den[j] + wi * s;                                    \
        }                                                                                        \
    }                                                                                            \
    for (int j = 0; j < c; j++) {                                                                \
        T d = by_count ? (den[j] < 1 ? (T)1 : den[j]) : (den[j] == 0 ? (T)1 : den[j]);           \
        out[e0 + j] = num[j] * g[j] / d;                                                         \
    }

/* count entries s0 .. s0 + cs - 1 of x (a vector loop; only a run that holds a window
 * entry is looked at again, one by one); flag[j] |= in the window */
#define COUNT_SUB(T, I, ABS, x, l, h, rl, rh, above, window, nw, flag, any)                      \
    do {                                                                                         \
        I n_above = 0, n_in = 0;                                                                 \
        for (int j = s0; j < s0 + cs; j++) {                                                     \
            T a = ABS(x[j]);                                                                     \
            n_above += a > h;                                                                    \
            n_in += (a >= l) & (a <= h);                                                         \
        }                                                                                        \
        above += n_above;                                                                        \
        if (n_in) {                                                                              \
            any = 1;                                                                             \
            for (int j = s0; j < s0 + cs; j++) {                                                 \
                T a = ABS(x[j]);                                                                 \
                if ((a >= l) & (a <= h))                                                         \
                    window[nw++] = a;                                                            \
                flag[j] |= (a >= rl) & (a <= rh);                                                \
            }                                                                                    \
        }                                                                                        \
    } while (0)

#define KERNELS(T, I, SUF, ABS)                                                                  \
    CLONES int64_t loramix_count_##SUF##_generic(const T *x, int64_t m, T lo, T hi, T *window,            \
                                       int64_t *n_window)                                       \
    {                                                                                            \
        I flag[SUB];                                                                             \
        int64_t above = 0, nw = 0;                                                               \
        for (int64_t e0 = 0; e0 < m; e0 += SUB) {                                                \
            int s0 = 0, cs = m - e0 < SUB ? (int)(m - e0) : SUB, any = 0;                        \
            const T *xe = x + e0;                                                                \
            for (int j = 0; j < cs; j++)                                                         \
                flag[j] = 0;                                                                     \
            COUNT_SUB(T, I, ABS, xe, lo, hi, (T)INFINITY, -(T)INFINITY, above, window, nw, flag, any);                      \
            (void)any;                                                                           \
        }                                                                                        \
        *n_window = nw;                                                                          \
        return above;                                                                            \
    }                                                                                            \
                                                                                                 \
    CLONES void loramix_elect_##SUF##_generic(int n, const T *const *xs, const T *lam, const T *w,        \
                                    int mass, int by_count, T *out, int64_t m)                  \
    {                                                                                            \
        T g[CHUNK], num[CHUNK], den[CHUNK];                                                      \
        for (int64_t e0 = 0; e0 < m; e0 += CHUNK) {                                              \
            int c = m - e0 < CHUNK ? (int)(m - e0) : CHUNK;                                      \
            ELECT_CHUNK(T, lam)                                                                  \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    CLONES int64_t loramix_pass_##SUF##_generic(int n, const T *const *xs, const T *lo, const T *hi,      \
                                      const T *prov, const T *rlo, const T *rhi, const T *w, int mass, int by_count, T *out, int64_t m, \
                                      int64_t *above, T *const *window, int64_t *n_window,      \
                                      int64_t *pos, T *const *vals)                             \
    {                                                                                            \
        T g[CHUNK], num[CHUNK], den[CHUNK];                                                      \
        I flag[CHUNK];                                                                           \
        int64_t rec = 0;                                                                         \
        for (int i = 0; i < n; i++)                                                              \
            above[i] = n_window[i] = 0;                                                          \
        for (int64_t e0 = 0; e0 < m; e0 += CHUNK) {                                              \
            int c = m - e0 < CHUNK ? (int)(m - e0) : CHUNK;                                      \
            int any[CHUNK / SUB] = {0};                                                          \
            for (int j = 0; j < c; j++)                                                          \
                flag[j] = 0;                                                                     \
            for (int i = 0; i < n; i++) {                                                        \
                /* locals: the compiler cannot know that the outputs do not alias the inputs */  \
                const T *x = xs[i] + e0;                                                         \
                const T l = lo[i], h = hi[i];                                                    \
                T *win = window[i];                                                              \
                int64_t a_i = above[i], nw = n_window[i];                                        \
                for (int s0 = 0; s0 < c; s0 += SUB) {                                            \
                    int cs = c - s0 < SUB ? c - s0 : SUB;                                        \
                    COUNT_SUB(T, I, ABS, x, l, h, rlo[i], rhi[i], a_i, win, nw, flag, any[s0 / SUB]);            \
                }                                                                                \
                above[i] = a_i;                                                                  \
                n_window[i] = nw;                                                                \
            }                                                                                    \
            ELECT_CHUNK(T, prov)                                                                 \
            for (int s0 = 0; s0 < c; s0 += SUB) {                                                \
                if (!any[s0 / SUB])                                                              \
                    continue;                                                                    \
                int end = c - s0 < SUB ? c : s0 + SUB;                                           \
                for (int j = s0; j < end; j++)                                                   \
                    if (flag[j]) {                                                               \
                        pos[rec] = e0 + j;                                                       \
                        for (int i = 0; i < n; i++)                                              \
                            vals[i][rec] = xs[i][e0 + j];                                        \
                        rec++;                                                                   \
                    }                                                                            \
            }                                                                                    \
        }                                                                                        \
        return rec;                                                                              \
    }

KERNELS(float, int32_t, f32, fabsf)
KERNELS(double, int64_t, f64, fabs)

#ifdef AVX512
/*
 * AVX-512: W lanes at a time with every adapter's values in registers. A compare
 * gives the lanes' answers as the bits of a mask; popcount counts them; a compress
 * appends the lanes in the window, in order (APPEND); the records' positions are the
 * set bits. The operations are the generic loop's, rewritten lane for lane where
 * a cheaper one gives the same bits:
 *   hardshrink's cut  (x >= -l) & (x <= l)  is  |x| <= l  (NaN: false either way;
 *                     l < 0: never);
 *   clamp  y < 0 ? 0 : y  is  max(0, y) in that operand order (MAXPS returns its
 *                     second operand for two zeros and for a NaN);
 *   den + s or den + w s, with s = (y > 0) as 0/1 (after the clamp y < 0 never
 *                     holds), is den plus 1 or w in the lanes where y > 0: adding
 *                     +0 or -0 (w s with s = 0) to den changes nothing, as den,
 *                     a sum started at +0, is never -0;
 *   q / den           by a count that is a power of two in every lane (1, 2, 4:
 *                     nearly always) is q * 2^-e: both are the real q / 2^e rounded
 *                     once, and a NaN q comes back from either (quieted) as the first
 *                     operand. 2^-e is exact, its bits RCP - den's (den = 2^e, whole,
 *                     has no mantissa bits). A brute-force check of every float32 q
 *                     and 2^28 float64 ones, e = 0 .. 6, found no difference; a
 *                     division costs about a third of this kernel.
 * The pass is compiled once per number of adapters 1 .. 4 (pass_body inlined with n
 * a constant): the loops over the adapters unroll and their vectors, thresholds and
 * counts stay in registers (1.4x faster for three adapters).
 * The comparisons are the ordered quiet ones (_CMP_LE_OQ ...): false for NaN, as C's.
 */
/*
 * APPEND: the lanes `in` of v stored in order at p. In a whole vector (lanes all set) as a
 * compress into a register and a whole store, which also writes W - |in| lanes of junk
 * after them: inside the buffer, which holds the m entries and has at most e of them
 * before this vector, so junk that a later append or nothing reads. In the last, partial
 * vector, where that bound does not hold, as the masked compress store. Zen 4 runs the
 * compress store to memory in microcode, about 70 cycles even in the L1 cache (the
 * register form and a store: a few); a window holds ~0.5% of a 7B module's entries,
 * so about 8% of a delta's vectors append, and that store took a third of the pass.
 */
#define APPEND(S, MT, lanes, p, in, v)                                                           \
    do {                                                                                         \
        if ((lanes) == (MT)-1)                                                                   \
            _mm512_storeu_##S((p), _mm512_maskz_compress_##S((in), (v)));                        \
        else                                                                                     \
            _mm512_mask_compressstoreu_##S((p), (in), (v));                                      \
    } while (0)

/* the pass with a constant number of adapters N, for ISA (avx512 / avx2): its
 * pass_body inlined with n a constant */
#define PASS_N(ISA_FN, ISA, T, SUF, N)                                                           \
    ISA_FN static int64_t pass_##ISA##_##SUF##_##N(                                              \
        const T *const *xs, const T *lo, const T *hi, const T *prov, const T *rlo, const T *rhi, \
        const T *w, int mass, int by_count, T *out, int64_t m, int64_t *above, T *const *window, \
        int64_t *n_window, int64_t *pos, T *const *vals)                                         \
    {                                                                                            \
        return pass_body_##ISA##_##SUF(N, xs, lo, hi, prov, rlo, rhi, w, mass, by_count, out, m, \
                                       above, window, n_window, pos, vals);                      \
    }

/* pass_<ISA>_<SUF>: the copies for 1 .. 4 adapters, and pass_body for more */
#define PASS_BY_N(ISA_FN, ISA, T, SUF)                                                           \
    PASS_N(ISA_FN, ISA, T, SUF, 1)                                                               \
    PASS_N(ISA_FN, ISA, T, SUF, 2)                                                               \
    PASS_N(ISA_FN, ISA, T, SUF, 3)                                                               \
    PASS_N(ISA_FN, ISA, T, SUF, 4)                                                               \
    ISA_FN static int64_t pass_##ISA##_##SUF(int n, const T *const *xs, const T *lo, const T *hi, \
                                             const T *prov, const T *rlo, const T *rhi,         \
                                             const T *w, int mass, int by_count, T *out,         \
                                             int64_t m, int64_t *above, T *const *window,        \
                                             int64_t *n_window, int64_t *pos, T *const *vals)    \
    {                                                                                            \
        static int64_t (*const fixed[])(const T *const *, const T *, const T *, const T *,      \
                                        const T *, const T *, const T *, int, int, T *, int64_t, \
                                        int64_t *, T *const *, int64_t *, int64_t *, T *const *) = { \
            pass_##ISA##_##SUF##_1, pass_##ISA##_##SUF##_2, pass_##ISA##_##SUF##_3,              \
            pass_##ISA##_##SUF##_4};                                                             \
        if (n >= 1 && n <= 4)                                                                    \
            return fixed[n - 1](xs, lo, hi, prov, rlo, rhi, w, mass, by_count, out, m, above,   \
                                window, n_window, pos, vals);                                    \
        return pass_body_##ISA##_##SUF(n, xs, lo, hi, prov, rlo, rhi, w, mass, by_count, out, m, \
                                       above, window, n_window, pos, vals);                      \
    }

/* the records of the vector at e: for each lane set in bits, its position, and every
 * adapter's value there (in a pass body) */
#define RECORD(bits, e)                                                                          \
    for (unsigned b_ = (bits); b_; b_ &= b_ - 1) {                                               \
        int64_t j_ = (e) + __builtin_ctz(b_);                                                    \
        pos[rec] = j_;                                                                           \
        for (int i = 0; i < n; i++)                                                              \
            vals[i][rec] = xp[i][j_];                                                            \
        rec++;                                                                                   \
    }

/*
 * The step (the arguments after m) for the vectors at e = 0, W, 2W, ... below m, given
 * lanes, the mask of its lanes below m: a constant in the loop over the whole vectors,
 * where the compiler then drops the masks (and the branches and spills they brought), and
 * the last, partial vector on its own. Three adapters, one thread, 64K to 4M entries:
 * pass 1.12-1.26x, count 1.15x, elect 1.06x faster than with lanes computed per vector.
 */
#define BY_VECTORS(W, MT, m, ...)                                                                \
    do {                                                                                         \
        int64_t e = 0;                                                                           \
        for (; e + (W) <= (m); e += (W)) {                                                       \
            const MT lanes = (MT)-1;                                                             \
            __VA_ARGS__                                                                          \
        }                                                                                        \
        if (e < (m)) {                                                                           \
            const MT lanes = (MT)((1u << ((m) - e)) - 1);                                        \
            __VA_ARGS__                                                                          \
        }                                                                                        \
    } while (0)

#define AVX512_KERNELS(T, SUF, VT, MT, S, ABSMASK, EPI, MANT, RCP)                            \
    enum { W_##SUF = 64 / sizeof(T) };                                                           \
                                                                                                 \
    AVX512_FN static inline VT abs_##SUF(VT x)                                                   \
    {                                                                                            \
        return _mm512_castsi512_##S(_mm512_and_si512(_mm512_cast##S##_si512(x), ABSMASK));       \
    }                                                                                            \
                                                                                                 \
    /* the election of the lanes of e given each adapter's trimmed values t[i] */               \
    AVX512_FN static inline __attribute__((always_inline)) void elect_t_##SUF(                  \
        int n, const VT *t, int64_t e, MT lanes, const VT *vw, int mass, int by_count, T *out)   \
    {                                                                                            \
        const VT zero = _mm512_setzero_##S(), one = _mm512_set1_##S(1), minus = _mm512_set1_##S(-1); \
        VT g = zero, num = zero, den = zero;                                                     \
        for (int i = 0; i < n; i++) {                                                            \
            VT s = mass ? t[i]                                                                   \
                        : _mm512_mask_mov_##S(_mm512_mask_mov_##S(zero, _mm512_cmp_##S##_mask(t[i], zero, _CMP_LT_OQ), minus), \
                                              _mm512_cmp_##S##_mask(t[i], zero, _CMP_GT_OQ), one); \
            g = i ? _mm512_add_##S(g, s) : s;                                                    \
        }                                                                                        \
        g = _mm512_mask_mov_##S(minus, _mm512_cmp_##S##_mask(g, zero, _CMP_GE_OQ), one);         \
        for (int i = 0; i < n; i++) {                                                            \
            VT y = _mm512_max_##S(zero, _mm512_mul_##S(t[i], g));                                \
            num = _mm512_add_##S(num, y);                                                        \
            MT kept = _mm512_cmp_##S##_mask(y, zero, _CMP_GT_OQ);                                \
            den = _mm512_mask_add_##S(den, kept, den, by_count ? one : vw[i]);                   \
        }                                                                                        \
        MT fix = by_count ? _mm512_cmp_##S##_mask(den, one, _CMP_LT_OQ)                          \
                          : _mm512_cmp_##S##_mask(den, zero, _CMP_EQ_OQ);                        \
        den = _mm512_mask_mov_##S(den, fix, one);                                                \
        VT q = _mm512_mul_##S(num, g);                                                           \
        /* a count of 1, 2 or 4 (most lanes): q / 2^e is q * 2^-e, the same real rounded once */ \
        /* (den, whole and >= 1 there, is 2^e when it has no mantissa bits; 2^-e = RCP - den) */ \
        __m512i bits = _mm512_cast##S##_si512(den);                                              \
        if (by_count && !_mm512_test_##EPI##_mask(bits, MANT))                                   \
            q = _mm512_mul_##S(q, _mm512_castsi512_##S(_mm512_sub_##EPI(RCP, bits)));            \
        else                                                                                     \
            q = _mm512_div_##S(q, den);                                                          \
        _mm512_mask_storeu_##S(out + e, lanes, q);                                               \
    }                                                                                            \
                                                                                                 \
    AVX512_FN static void elect_avx512_##SUF(int n, const T *const *xs, const T *lam, const T *w, \
                                             int mass, int by_count, T *out, int64_t m)          \
    {                                                                                            \
        VT t[MAX_ADAPTERS], vw[MAX_ADAPTERS];                                                    \
        for (int i = 0; i < n; i++)                                                              \
            vw[i] = _mm512_set1_##S(w[i]);                                                       \
        BY_VECTORS(W_##SUF, MT, m, {                                                             \
            for (int i = 0; i < n; i++) {                                                        \
                VT x = _mm512_maskz_loadu_##S(lanes, xs[i] + e);                                 \
                MT cut = _mm512_cmp_##S##_mask(abs_##SUF(x), _mm512_set1_##S(lam[i]), _CMP_LE_OQ); \
                t[i] = _mm512_mask_mov_##S(x, cut, _mm512_setzero_##S());                        \
            }                                                                                    \
            elect_t_##SUF(n, t, e, lanes, vw, mass, by_count, out);                              \
        });                                                                                      \
    }                                                                                            \
                                                                                                 \
    AVX512_FN static int64_t count_avx512_##SUF(const T *x, int64_t m, T lo, T hi, T *window,    \
                                                int64_t *n_window)                               \
    {                                                                                            \
        const VT vlo = _mm512_set1_##S(lo), vhi = _mm512_set1_##S(hi);                           \
        int64_t above = 0, nw = 0;                                                               \
        BY_VECTORS(W_##SUF, MT, m, {                                                             \
            VT a = abs_##SUF(_mm512_maskz_loadu_##S(lanes, x + e));                              \
            MT le = _mm512_cmp_##S##_mask(a, vhi, _CMP_LE_OQ) & lanes;                           \
            MT in = _mm512_cmp_##S##_mask(a, vlo, _CMP_GE_OQ) & le;                              \
            above += __builtin_popcount(_mm512_cmp_##S##_mask(a, vhi, _CMP_GT_OQ) & lanes);      \
            if (in) {                                                                            \
                APPEND(S, MT, lanes, window + nw, in, a);                                        \
                nw += __builtin_popcount(in);                                                    \
            }                                                                                    \
        });                                                                                      \
        *n_window = nw;                                                                          \
        return above;                                                                            \
    }                                                                                            \
                                                                                                 \
    /* the pass for n adapters; inlined into one copy per small n (a constant: the      */  \
    /* adapters' loops unrolled, their vectors and counts kept in registers)              */  \
    AVX512_FN static inline __attribute__((always_inline)) int64_t pass_body_avx512_##SUF(         \
        const int n, const T *const *xs, const T *lo, const T *hi, const T *prov, const T *rlo, \
        const T *rhi, const T *w, int mass, int by_count, T *out, int64_t m, int64_t *above,   \
        T *const *window, int64_t *n_window, int64_t *pos, T *const *vals)                     \
    {                                                                                            \
        VT t[MAX_ADAPTERS], vw[MAX_ADAPTERS], vlo[MAX_ADAPTERS], vhi[MAX_ADAPTERS], vprov[MAX_ADAPTERS]; \
        const T *xp[MAX_ADAPTERS];                                                               \
        T *win[MAX_ADAPTERS];                                                                    \
        int64_t rec = 0, ab[MAX_ADAPTERS], nw[MAX_ADAPTERS];                                     \
        for (int i = 0; i < n; i++) {                                                            \
            ab[i] = nw[i] = 0;                                                                   \
            xp[i] = xs[i];                                                                       \
            win[i] = window[i];                                                                  \
            vw[i] = _mm512_set1_##S(w[i]);                                                       \
            vlo[i] = _mm512_set1_##S(lo[i]);                                                     \
            vhi[i] = _mm512_set1_##S(hi[i]);                                                     \
            vprov[i] = _mm512_set1_##S(prov[i]);                                                 \
        }                                                                                        \
        BY_VECTORS(W_##SUF, MT, m, {                                                             \
            MT any = 0;                                                                          \
            for (int i = 0; i < n; i++) {                                                        \
                VT x = _mm512_maskz_loadu_##S(lanes, xp[i] + e), a = abs_##SUF(x);               \
                MT cut = _mm512_cmp_##S##_mask(a, vhi[i], _CMP_LE_OQ);                           \
                MT in = _mm512_cmp_##S##_mask(a, vlo[i], _CMP_GE_OQ) & cut & lanes;              \
                ab[i] += __builtin_popcount(_mm512_cmp_##S##_mask(a, vhi[i], _CMP_GT_OQ) & lanes); \
                if (in) {                                                                        \
                    APPEND(S, MT, lanes, win[i] + nw[i], in, a);                                 \
                    nw[i] += __builtin_popcount(in);                                             \
                    any |= in & _mm512_cmp_##S##_mask(a, _mm512_set1_##S(rlo[i]), _CMP_GE_OQ) &  \
                           _mm512_cmp_##S##_mask(a, _mm512_set1_##S(rhi[i]), _CMP_LE_OQ);        \
                }                                                                                \
                cut = _mm512_cmp_##S##_mask(a, vprov[i], _CMP_LE_OQ);                            \
                t[i] = _mm512_mask_mov_##S(x, cut, _mm512_setzero_##S());                        \
            }                                                                                    \
            elect_t_##SUF(n, t, e, lanes, vw, mass, by_count, out);                               \
            RECORD(any, e);                                                                      \
        });                                                                                      \
        for (int i = 0; i < n; i++) {                                                            \
            above[i] = ab[i];                                                                    \
            n_window[i] = nw[i];                                                                 \
        }                                                                                        \
        return rec;                                                                              \
    }                                                                                            \
                                                                                                 \
    PASS_BY_N(AVX512_FN, avx512, T, SUF)

AVX512_KERNELS(float, f32, __m512, __mmask16, ps, _mm512_set1_epi32(0x7fffffff), epi32,
               _mm512_set1_epi32(0x007fffff), _mm512_set1_epi32(0x7f000000))
AVX512_KERNELS(double, f64, __m512d, __mmask8, pd, _mm512_set1_epi64(0x7fffffffffffffffLL), epi64,
               _mm512_set1_epi64(0x000fffffffffffffLL), _mm512_set1_epi64(0x7fe0000000000000LL))
#endif

#ifdef AVX2
/*
 * AVX2 (for CPUs without AVX-512): the AVX-512 kernels' operations, lane for lane,
 * on 8 (float32) or 4 (float64) lanes. AVX2 has no mask registers: a comparison
 * gives a vector of all-ones / all-zeros lanes, movemask its lanes' bits, and the
 * AVX-512 forms become
 *   t = mask_mov(x, |x| <= l, 0)      ->  andnot(|x| <= l, x)  (+0 where cut);
 *   den = mask_add(den, y > 0, den, v) ->  den + and(y > 0, v): adds v or +0, and
 *                                       den (a sum started at +0) is never -0, so
 *                                       adding +0 changes nothing;
 *   compress store of the window      ->  the lanes' set bits in order, one by one
 *                                       (a window holds ~1% of the entries);
 * and the last, partial vector is loaded and stored with maskload / maskstore
 * (zeros in the lanes past m, as maskz_loadu), every count and record limited to
 * the lanes below m. The clamp max(0, y), the power-of-two division and the
 * comparisons are the AVX-512 kernels' (see there). The pass is compiled once per
 * number of adapters 1 .. 4, as there.
 */

/* the step for the vectors at e = 0, W, 2W, ... below m: full (a constant 1) in the
 * loop over the whole vectors, then 0 for the last, partial one; lanes and lanebits:
 * its lanes below m as a vector mask and as bits */
#define BY_VECTORS2(W, VT, S, LANES, m, ...)                                                     \
    do {                                                                                         \
        int64_t e = 0;                                                                           \
        for (; e + (W) <= (m); e += (W)) {                                                       \
            const int full = 1, lanebits = (1 << (W)) - 1;                                       \
            const VT lanes = _mm256_castsi256_##S(_mm256_set1_epi32(-1));                        \
            (void)lanes, (void)lanebits;                                                         \
            __VA_ARGS__                                                                          \
        }                                                                                        \
        if (e < (m)) {                                                                           \
            const int full = 0, lanebits = (1 << ((m) - e)) - 1;                                 \
            const VT lanes = LANES((m) - e);                                                     \
            (void)lanebits;                                                                      \
            __VA_ARGS__                                                                          \
        }                                                                                        \
    } while (0)

#define LOAD2(S, p) (full ? _mm256_loadu_##S(p) : _mm256_maskload_##S((p), _mm256_cast##S##_si256(lanes)))

#define AVX2_KERNELS(T, SUF, VT, S, EPI, W, LANES, ABSMASK, MANT, RCP)                          \
    /* the election of the lanes of e given each adapter's trimmed values t[i] */               \
    AVX2_FN static inline __attribute__((always_inline)) void elect2_t_##SUF(                   \
        int n, const VT *t, int64_t e, int full, VT lanes, const VT *vw, int mass, int by_count, \
        T *out)                                                                                  \
    {                                                                                            \
        const VT zero = _mm256_setzero_##S(), one = _mm256_set1_##S(1), minus = _mm256_set1_##S(-1); \
        VT g = zero, num = zero, den = zero;                                                     \
        for (int i = 0; i < n; i++) {                                                            \
            VT s = mass ? t[i]                                                                   \
                        : _mm256_or_##S(_mm256_and_##S(_mm256_cmp_##S(t[i], zero, _CMP_GT_OQ), one), \
                                        _mm256_and_##S(_mm256_cmp_##S(t[i], zero, _CMP_LT_OQ), minus)); \
            g = i ? _mm256_add_##S(g, s) : s;                                                    \
        }                                                                                        \
        g = _mm256_blendv_##S(minus, one, _mm256_cmp_##S(g, zero, _CMP_GE_OQ));                 \
        for (int i = 0; i < n; i++) {                                                            \
            VT y = _mm256_max_##S(zero, _mm256_mul_##S(t[i], g));                                \
            num = _mm256_add_##S(num, y);                                                        \
            den = _mm256_add_##S(den, _mm256_and_##S(_mm256_cmp_##S(y, zero, _CMP_GT_OQ),         \
                                                     by_count ? one : vw[i]));                   \
        }                                                                                        \
        VT fix = by_count ? _mm256_cmp_##S(den, one, _CMP_LT_OQ) : _mm256_cmp_##S(den, zero, _CMP_EQ_OQ); \
        den = _mm256_blendv_##S(den, one, fix);                                                  \
        VT q = _mm256_mul_##S(num, g);                                                           \
        __m256i bits = _mm256_cast##S##_si256(den);                                              \
        if (by_count && _mm256_testz_si256(bits, MANT))                                          \
            q = _mm256_mul_##S(q, _mm256_castsi256_##S(_mm256_sub_##EPI(RCP, bits)));            \
        else                                                                                     \
            q = _mm256_div_##S(q, den);                                                          \
        if (full)                                                                                \
            _mm256_storeu_##S(out + e, q);                                                       \
        else                                                                                     \
            _mm256_maskstore_##S(out + e, _mm256_cast##S##_si256(lanes), q);                     \
    }                                                                                            \
                                                                                                 \
    AVX2_FN static void elect_avx2_##SUF(int n, const T *const *xs, const T *lam, const T *w,    \
                                         int mass, int by_count, T *out, int64_t m)              \
    {                                                                                            \
        const VT absmask = _mm256_castsi256_##S(ABSMASK);                                        \
        VT t[MAX_ADAPTERS], vw[MAX_ADAPTERS], vlam[MAX_ADAPTERS];                                \
        for (int i = 0; i < n; i++) {                                                            \
            vw[i] = _mm256_set1_##S(w[i]);                                                       \
            vlam[i] = _mm256_set1_##S(lam[i]);                                                   \
        }                                                                                        \
        BY_VECTORS2(W, VT, S, LANES, m, {                                                        \
            for (int i = 0; i < n; i++) {                                                        \
                VT x = LOAD2(S, xs[i] + e);                                                      \
                t[i] = _mm256_andnot_##S(_mm256_cmp_##S(_mm256_and_##S(x, absmask), vlam[i], _CMP_LE_OQ), x); \
            }                                                                                    \
            elect2_t_##SUF(n, t, e, full, lanes, vw, mass, by_count, out);                       \
        });                                                                                      \
    }                                                                                            \
                                                                                                 \
    /* the pass for n adapters; inlined into one copy per small n, as the AVX-512 one */            \
    AVX2_FN static inline __attribute__((always_inline)) int64_t pass_body_avx2_##SUF(              \
        const int n, const T *const *xs, const T *lo, const T *hi, const T *prov, const T *rlo, \
        const T *rhi, const T *w, int mass, int by_count, T *out, int64_t m, int64_t *above,   \
        T *const *window, int64_t *n_window, int64_t *pos, T *const *vals)                     \
    {                                                                                            \
        const VT absmask = _mm256_castsi256_##S(ABSMASK);                                        \
        VT t[MAX_ADAPTERS], vw[MAX_ADAPTERS], vlo[MAX_ADAPTERS], vhi[MAX_ADAPTERS], vprov[MAX_ADAPTERS]; \
        const T *xp[MAX_ADAPTERS];                                                               \
        T *win[MAX_ADAPTERS];                                                                    \
        int64_t rec = 0, ab[MAX_ADAPTERS], nw[MAX_ADAPTERS];                                     \
        for (int i = 0; i < n; i++) {                                                            \
            ab[i] = nw[i] = 0;                                                                   \
            xp[i] = xs[i];                                                                       \
            win[i] = window[i];                                                                  \
            vw[i] = _mm256_set1_##S(w[i]);                                                       \
            vlo[i] = _mm256_set1_##S(lo[i]);                                                     \
            vhi[i] = _mm256_set1_##S(hi[i]);                                                     \
            vprov[i] = _mm256_set1_##S(prov[i]);                                                 \
        }                                                                                        \
        BY_VECTORS2(W, VT, S, LANES, m, {                                                        \
            int any = 0;                                                                         \
            for (int i = 0; i < n; i++) {                                                        \
                VT x = LOAD2(S, xp[i] + e), a = _mm256_and_##S(x, absmask);                      \
                int in = _mm256_movemask_##S(_mm256_and_##S(_mm256_cmp_##S(a, vlo[i], _CMP_GE_OQ), \
                                                            _mm256_cmp_##S(a, vhi[i], _CMP_LE_OQ))) & \
                         lanebits;                                                               \
                ab[i] += __builtin_popcount(_mm256_movemask_##S(_mm256_cmp_##S(a, vhi[i], _CMP_GT_OQ)) & \
                                            lanebits);                                           \
                if (in) {                                                                        \
                    T av[W];                                                                     \
                    _mm256_storeu_##S(av, a);                                                    \
                    for (unsigned b = in; b; b &= b - 1)                                         \
                        win[i][nw[i]++] = av[__builtin_ctz(b)];                                  \
                    any |= in & _mm256_movemask_##S(                                             \
                                    _mm256_and_##S(_mm256_cmp_##S(a, _mm256_set1_##S(rlo[i]), _CMP_GE_OQ), \
                                                   _mm256_cmp_##S(a, _mm256_set1_##S(rhi[i]), _CMP_LE_OQ))); \
                }                                                                                \
                t[i] = _mm256_andnot_##S(_mm256_cmp_##S(a, vprov[i], _CMP_LE_OQ), x);            \
            }                                                                                    \
            elect2_t_##SUF(n, t, e, full, lanes, vw, mass, by_count, out);                       \
            RECORD(any, e);                                                                      \
        });                                                                                      \
        for (int i = 0; i < n; i++) {                                                            \
            above[i] = ab[i];                                                                    \
            n_window[i] = nw[i];                                                                 \
        }                                                                                        \
        return rec;                                                                              \
    }                                                                                            \
                                                                                                 \
    PASS_BY_N(AVX2_FN, avx2, T, SUF)

/* the lanes below r (1 <= r < W) as a vector mask */
AVX2_FN static inline __m256 lanes2_f32(int64_t r)
{
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
AVX2_FN static inline __m256d lanes2_f64(int64_t r)
{
    return _mm256_castsi256_pd(_mm256_cmpgt_epi64(_mm256_set1_epi64x(r), _mm256_setr_epi64x(0, 1, 2, 3)));
}

AVX2_KERNELS(float, f32, __m256, ps, epi32, 8, lanes2_f32, _mm256_set1_epi32(0x7fffffff),
             _mm256_set1_epi32(0x007fffff), _mm256_set1_epi32(0x7f000000))
AVX2_KERNELS(double, f64, __m256d, pd, epi64, 4, lanes2_f64, _mm256_set1_epi64x(0x7fffffffffffffffLL),
             _mm256_set1_epi64x(0x000fffffffffffffLL), _mm256_set1_epi64x(0x7fe0000000000000LL))

/* the AVX2 forms by name, for the tests (on a CPU with AVX2: loramix_has_avx2) */
#define AVX2_ENTRY_POINTS(T, SUF)                                                                \
    void loramix_elect_##SUF##_avx2(int n, const T *const *xs, const T *lam, const T *w, int mass, \
                                    int by_count, T *out, int64_t m)                             \
    {                                                                                            \
        (n <= MAX_ADAPTERS ? elect_avx2_##SUF : loramix_elect_##SUF##_generic)(n, xs, lam, w, mass, by_count, out, m); \
    }                                                                                            \
                                                                                                 \
    int64_t loramix_pass_##SUF##_avx2(int n, const T *const *xs, const T *lo, const T *hi,       \
                                      const T *prov, const T *rlo, const T *rhi, const T *w,    \
                                      int mass, int by_count, T *out, int64_t m, int64_t *above, \
                                      T *const *window, int64_t *n_window, int64_t *pos,        \
                                      T *const *vals)                                            \
    {                                                                                            \
        return (n <= MAX_ADAPTERS ? pass_avx2_##SUF : loramix_pass_##SUF##_generic)(             \
            n, xs, lo, hi, prov, rlo, rhi, w, mass, by_count, out, m, above, window, n_window, pos, vals); \
    }

AVX2_ENTRY_POINTS(float, f32)
AVX2_ENTRY_POINTS(double, f64)

/*
 * form + pass (float32): the one pass over a block of rows of deltas given by their
 * factors B_i (rows x K) and A_i (K x cols), each delta's rows formed a few at a time
 * into a tile and passed at once, from the cache, instead of the whole block
 * formed by torch.mm (MKL: a pass that zeroes the output, the product, the block written
 * to and read back from the L3 cache or memory). form:
 *     tile[r, c] = the chain  acc = +0;  acc = fma(B[r, k], A[k, c], acc),  k = 0 .. K-1
 * one rounding per step, k in order: the operations MKL's sgemm kernels perform for
 * these shapes (its output zeroed, then each entry accumulated along k in a register).
 * loramix takes this way only after checking, on this machine, that it gives torch.mm's
 * bits for the block's shape (loramix.native.ties.Ties.forms_like_mm): then the pass
 * sees the blocks it would have seen, and the merge has the same bits.
 * The tiles are cut by rows (every tile_rows rows), so the pass's entries and records
 * stay in the block's order; a record's position is made the block's.
 */
#define FMA_FN __attribute__((target("avx2,fma,popcnt")))

/* 4 rows x 4 vectors of 16 lanes at a time: A's 64 columns read once for the 4 rows */
AVX512_FN static void form_avx512(const float *B, const float *A, int64_t K, int64_t rows,
                                  int64_t cols, float *out)
{
    int64_t c = 0;
    for (; c + 64 <= cols; c += 64) {
        int64_t r = 0;
        for (; r + 4 <= rows; r += 4) {
            __m512 acc[4][4];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++)
                    acc[i][j] = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k++) {
                const float *a = A + k * cols + c;
                __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + 16);
                __m512 a2 = _mm512_loadu_ps(a + 32), a3 = _mm512_loadu_ps(a + 48);
                for (int i = 0; i < 4; i++) {
                    __m512 b = _mm512_set1_ps(B[(r + i) * K + k]);
                    acc[i][0] = _mm512_fmadd_ps(b, a0, acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(b, a1, acc[i][1]);
                    acc[i][2] = _mm512_fmadd_ps(b, a2, acc[i][2]);
                    acc[i][3] = _mm512_fmadd_ps(b, a3, acc[i][3]);
                }
            }
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++)
                    _mm512_storeu_ps(out + (r + i) * cols + c + 16 * j, acc[i][j]);
        }
        for (; r < rows; r++) {
            __m512 acc[4];
            for (int j = 0; j < 4; j++)
                acc[j] = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k++) {
                __m512 b = _mm512_set1_ps(B[r * K + k]);
                for (int j = 0; j < 4; j++)
                    acc[j] = _mm512_fmadd_ps(b, _mm512_loadu_ps(A + k * cols + c + 16 * j), acc[j]);
            }
            for (int j = 0; j < 4; j++)
                _mm512_storeu_ps(out + r * cols + c + 16 * j, acc[j]);
        }
    }
    for (; c < cols; c += 16) {
        __mmask16 lanes = cols - c >= 16 ? (__mmask16)-1 : (__mmask16)((1u << (cols - c)) - 1);
        for (int64_t r = 0; r < rows; r++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(B[r * K + k]),
                                      _mm512_maskz_loadu_ps(lanes, A + k * cols + c), acc);
            _mm512_mask_storeu_ps(out + r * cols + c, lanes, acc);
        }
    }
}

/* 4 rows x 3 vectors of 8 lanes at a time (12 accumulators in the 16 registers) */
FMA_FN static void form_avx2(const float *B, const float *A, int64_t K, int64_t rows,
                             int64_t cols, float *out)
{
    int64_t c = 0;
    for (; c + 24 <= cols; c += 24) {
        int64_t r = 0;
        for (; r + 4 <= rows; r += 4) {
            __m256 acc[4][3];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 3; j++)
                    acc[i][j] = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k++) {
                const float *a = A + k * cols + c;
                __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8), a2 = _mm256_loadu_ps(a + 16);
                for (int i = 0; i < 4; i++) {
                    __m256 b = _mm256_set1_ps(B[(r + i) * K + k]);
                    acc[i][0] = _mm256_fmadd_ps(b, a0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(b, a1, acc[i][1]);
                    acc[i][2] = _mm256_fmadd_ps(b, a2, acc[i][2]);
                }
            }
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 3; j++)
                    _mm256_storeu_ps(out + (r + i) * cols + c + 8 * j, acc[i][j]);
        }
        for (; r < rows; r++) {
            __m256 acc[3];
            for (int j = 0; j < 3; j++)
                acc[j] = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k++) {
                __m256 b = _mm256_set1_ps(B[r * K + k]);
                for (int j = 0; j < 3; j++)
                    acc[j] = _mm256_fmadd_ps(b, _mm256_loadu_ps(A + k * cols + c + 8 * j), acc[j]);
            }
            for (int j = 0; j < 3; j++)
                _mm256_storeu_ps(out + r * cols + c + 8 * j, acc[j]);
        }
    }
    for (; c < cols; c += 8) {
        __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols - c >= 8 ? 8 : (int)(cols - c)),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (int64_t r = 0; r < rows; r++) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k++)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(B[r * K + k]),
                                      _mm256_maskload_ps(A + k * cols + c, lanes), acc);
            _mm256_maskstore_ps(out + r * cols + c, lanes, acc);
        }
    }
}

typedef void (*form_fn)(const float *, const float *, int64_t, int64_t, int64_t, float *);
typedef int64_t (*pass_f32_fn)(int, const float *const *, const float *, const float *,
                               const float *, const float *, const float *, const float *, int, int,
                               float *, int64_t, int64_t *, float *const *, int64_t *, int64_t *,
                               float *const *);

/* isa 0: the best the CPU has, 2: the AVX2 form; NULL where it cannot run here */
static form_fn pick_form(int isa, pass_f32_fn *pass)
{
    if (isa == 0 && __builtin_cpu_supports("avx512f")) {
        *pass = pass_avx512_f32;
        return form_avx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        *pass = pass_avx2_f32;
        return form_avx2;
    }
    return 0;
}

/* out (rows x cols) = B @ A as the pass sees it; -1 where no form runs here */
int loramix_form_f32(int isa, const float *B, const float *A, int64_t K, int64_t rows, int64_t cols,
                     float *out)
{
    pass_f32_fn pass;
    form_fn form = pick_form(isa, &pass);
    if (!form)
        return -1;
    form(B, A, K, rows, cols, out);
    return 0;
}

typedef int (*add_bf16_fn)(const uint16_t *, const float *, uint16_t *, int64_t);

/* the pass (loramix_pass_f32's arguments and results) over the blocks B_i @ A_i, formed
 * tile_rows rows at a time into tiles[i] (tile_rows x cols each); -1 where no form runs
 * here.
 * With add (bf16.c's loramix_add_bf16), each tile's election goes into out, a tile of
 * its own (tile_rows x cols), and on at once, while it is in the cache, into
 * outb = bf16(f32(w0) + election) (outb may be w0); the records also keep w0 and the
 * provisional election at their positions (w0rec, provrec: read before outb is
 * written), and *bad |= some result is not finite. The fixup then needs no float32
 * copy of the whole result: bf16(w0 + the record's final election) at each record. */
int64_t loramix_formpass_f32(int isa, int n, const float *const *Bs, const float *const *As,
                             int64_t K, int64_t rows, int64_t cols, int64_t tile_rows,
                             float *const *tiles, const float *lo, const float *hi,
                             const float *prov, const float *rlo, const float *rhi, const float *w,
                             int mass, int by_count, float *out, int64_t *above,
                             float *const *window, int64_t *n_window, int64_t *pos,
                             float *const *vals, add_bf16_fn add, const uint16_t *w0,
                             uint16_t *outb, uint16_t *w0rec, float *provrec, int *bad)
{
    pass_f32_fn pass;
    form_fn form = n <= MAX_ADAPTERS && tile_rows > 0 ? pick_form(isa, &pass) : 0;
    if (!form)
        return -1;
    const float *xs[MAX_ADAPTERS];
    float *win[MAX_ADAPTERS], *val[MAX_ADAPTERS];
    int64_t rec = 0, ab[MAX_ADAPTERS], nw[MAX_ADAPTERS], ab_t[MAX_ADAPTERS], nw_t[MAX_ADAPTERS];
    for (int i = 0; i < n; i++) {
        ab[i] = nw[i] = 0;
        xs[i] = tiles[i];
    }
    for (int64_t r = 0; r < rows; r += tile_rows) {
        int64_t rr = rows - r < tile_rows ? rows - r : tile_rows;
        for (int i = 0; i < n; i++) {
            form(Bs[i] + r * K, As[i], K, rr, cols, tiles[i]);
            win[i] = window[i] + nw[i];
            val[i] = vals[i] + rec;
        }
        float *o = add ? out : out + r * cols;
        int64_t got = pass(n, xs, lo, hi, prov, rlo, rhi, w, mass, by_count, o, rr * cols,
                           ab_t, win, nw_t, pos + rec, val);
        for (int64_t j = 0; j < got; j++) {
            if (add) {
                w0rec[rec + j] = w0[r * cols + pos[rec + j]];
                provrec[rec + j] = o[pos[rec + j]];
            }
            pos[rec + j] += r * cols;
        }
        if (add)
            *bad |= add(w0 + r * cols, o, outb + r * cols, rr * cols);
        rec += got;
        for (int i = 0; i < n; i++) {
            ab[i] += ab_t[i];
            nw[i] += nw_t[i];
        }
    }
    for (int i = 0; i < n; i++) {
        above[i] = ab[i];
        n_window[i] = nw[i];
    }
    return rec;
}

int loramix_has_avx2(void) { return __builtin_cpu_supports("avx2"); }
int loramix_has_avx512(void) { return __builtin_cpu_supports("avx512f"); }
#endif

/* the entry points: the AVX-512 kernels where the CPU has them (and the adapters fit
 * their registers' array), else for elect and pass the AVX2 ones where it has those,
 * else the generic ones */
#ifdef AVX512
#define PICK(SUF, NAME, n)                                                                       \
    ((n) <= MAX_ADAPTERS && __builtin_cpu_supports("avx512f") ? NAME##_avx512_##SUF              \
                                                              : loramix_##NAME##_##SUF##_generic)
/* elect and pass: AVX2 where there is no AVX-512 */
#define PICK2(SUF, NAME, n)                                                                      \
    ((n) > MAX_ADAPTERS                     ? loramix_##NAME##_##SUF##_generic                   \
     : __builtin_cpu_supports("avx512f") ? NAME##_avx512_##SUF                                \
     : __builtin_cpu_supports("avx2")    ? NAME##_avx2_##SUF                                  \
                                         : loramix_##NAME##_##SUF##_generic)
#else
#define PICK(SUF, NAME, n) loramix_##NAME##_##SUF##_generic
#define PICK2 PICK
#endif

/* need[j] |= whether a trim at l keeps x[j] where a trim at p did not, or the other way,
   for j < c: |x| <= p is -p <= x <= p, NaN or not. Its own function, so that the
   compiler vectorises this loop alone rather than unrolling the adapters' loop */
#if defined(__GNUC__)
#define NOINLINE __attribute__((noinline))
#else
#define NOINLINE
#endif
#define MOVED(T, SUF)                                                                            \
    NOINLINE static void moved_##SUF(int *restrict need, const T *restrict x, T p, T l, int c) \
    {                                                                                            \
        for (int j = 0; j < c; j++) {                                                            \
            T a = x[j] < 0 ? -x[j] : x[j];                                                       \
            need[j] |= (a <= p) ^ (a <= l);                                                      \
        }                                                                                        \
    }
MOVED(float, f32)
MOVED(double, f64)

#define ENTRY_POINTS(T, SUF)                                                                     \
    void loramix_elect_##SUF(int n, const T *const *xs, const T *lam, const T *w, int mass,      \
                             int by_count, T *out, int64_t m)                                    \
    {                                                                                            \
        PICK2(SUF, elect, n)(n, xs, lam, w, mass, by_count, out, m);                                 \
    }                                                                                            \
                                                                                                 \
    int64_t loramix_count_##SUF(const T *x, int64_t m, T lo, T hi, T *window, int64_t *n_window) \
    {                                                                                            \
        return PICK(SUF, count, 1)(x, m, lo, hi, window, n_window);                                 \
    }                                                                                            \
                                                                                                 \
    int64_t loramix_pass_##SUF(int n, const T *const *xs, const T *lo, const T *hi, const T *prov, \
                               const T *rlo, const T *rhi, const T *w, int mass, int by_count,   \
                               T *out, int64_t m,                                                \
                               int64_t *above, T *const *window, int64_t *n_window, int64_t *pos, \
                               T *const *vals)                                                   \
    {                                                                                            \
        return PICK2(SUF, pass, n)(n, xs, lo, hi, prov, rlo, rhi, w, mass, by_count, out, m, above, window, \
                                  n_window, pos, vals);                                          \
    }                                                                                            \
                                                                                                 \
    /* out[pos[r]] for the records r where a trim at lam gives another t_i than the trim         \
       at prov did: the election of the record's values, one by one (about a tenth); which       \
       records those are is found a chunk at a time, adapter by adapter (vectorised) */          \
    int64_t loramix_fixup_##SUF(int n, const T *const *vals, const T *prov, const T *lam,        \
                                const T *w, int mass, int by_count, const int64_t *pos,          \
                                int64_t records, T *out)                                         \
    {                                                                                            \
        int64_t fixed = 0;                                                                       \
        int need[CHUNK];                                                                         \
        for (int64_t r0 = 0; r0 < records; r0 += CHUNK) {                                        \
            int c = records - r0 < CHUNK ? (int)(records - r0) : CHUNK;                          \
            for (int j = 0; j < c; j++)                                                          \
                need[j] = 0;                                                                     \
            for (int i = 0; i < n; i++) {                                                        \
                moved_##SUF(need, vals[i] + r0, prov[i], lam[i], c);                             \
            }                                                                                    \
            for (int j = 0; j < c; j++) {                                                        \
                if (!need[j])                                                                    \
                    continue;                                                                    \
                int64_t r = r0 + j;                                                              \
                T g = 0, num = 0, den = 0;                                                       \
                for (int i = 0; i < n; i++) {                                                    \
                    T v = vals[i][r], t = ((v >= -lam[i]) & (v <= lam[i])) ? (T)0 : v;           \
                    T s = mass ? t : (T)((t > 0) - (t < 0));                                     \
                    g = i ? g + s : s;                                                           \
                }                                                                                \
                g = g >= 0 ? (T)1 : (T)-1;                                                       \
                for (int i = 0; i < n; i++) {                                                    \
                    T v = vals[i][r], t = ((v >= -lam[i]) & (v <= lam[i])) ? (T)0 : v;           \
                    T y = t * g;                                                                 \
                    y = y < 0 ? (T)0 : y;                                                        \
                    num = num + y;                                                               \
                    T s = (T)((y > 0) - (y < 0));                                                \
                    den = by_count ? den + s : den + w[i] * s;                                   \
                }                                                                                \
                T d = by_count ? (den < 1 ? (T)1 : den) : (den == 0 ? (T)1 : den);               \
                out[pos[r]] = num * g / d;                                                       \
                fixed++;                                                                         \
            }                                                                                    \
        }                                                                                        \
        return fixed;                                                                            \
    }

ENTRY_POINTS(float, f32)
ENTRY_POINTS(double, f64)
