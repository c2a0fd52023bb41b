/*
 * TIES' two elementwise passes over one block of rows, fused: each runs the
 * operations of loramix.methods.base's eager (torch/numpy) code on a chunk of
 * CHUNK entries that stays in the L1 cache, instead of one whole-block pass
 * per operation. Same operations, same order, same rounding: the result has
 * the eager code's bits, NaN, infinities and signed zeros included
 * (tests/test_native.py checks every case).
 *
 * Built with -std=c11 -O3 -ffp-contract=off and no fast-math flag: no fused
 * multiply-add, no reassociation, signed zeros respected. The vector clones
 * (target_clones) differ only in the width of the same IEEE operations.
 *
 * count:  above = #{e : |x_e| > hi},  window = [|x_e| : lo <= |x_e| <= hi]
 *         (NaN in neither), as _abs_kth_largest_by_rows counts them.
 * elect:  t_i = hardshrink(x_i, lam_i)  (x where not -lam <= x <= lam, +0
 *         there; lam < 0: t_i = x_i untouched)
 *         g   = t_0 + t_1 + ...  (mass)  or  sign(t_0) + sign(t_1) + ... (count)
 *         g   = g >= 0 ? 1 : -1
 *         y_i = max(t_i g, 0) as clamp_(min=0) (-0 and NaN pass through)
 *         num = ((+0 + y_0) + y_1) + ...,  den = sum_i sign(y_i) [w_i]
 *         den = max(den, 1) (by count)  or  den == 0 ? 1 : den (by weight)
 *         out = num g / den
 *         with sign(v) = (v > 0) - (v < 0): NaN and -0 give +0, as torch.sign.
 */
#include <math.h>
#include <stdint.h>

#define CHUNK 256
#define COUNT_CHUNK 32

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define KERNELS(T, I, SUF, ABS)                                                                    \
    CLONES int64_t loramix_count_##SUF(const T *x, int64_t m, T lo, T hi, T *window,              \
                                       int64_t *n_window)                                         \
    {                                                                                              \
        I flag[COUNT_CHUNK];                                                                       \
        int64_t above = 0, w = 0;                                                                  \
        for (int64_t e0 = 0; e0 < m; e0 += COUNT_CHUNK) {                                          \
            int c = m - e0 < COUNT_CHUNK ? (int)(m - e0) : COUNT_CHUNK;                            \
            I n_above = 0, n_in = 0;                                                               \
            /* a vector loop; most chunks hold no window entry, and only one that holds */        \
            /* one is looked at again, entry by entry (NaN: in neither) */                          \
            for (int j = 0; j < c; j++) {                                                          \
                T a = ABS(x[e0 + j]);                                                              \
                I f = (a >= lo) & (a <= hi);                                                       \
                n_above += a > hi;                                                                 \
                n_in += f;                                                                         \
                flag[j] = f;                                                                       \
            }                                                                                      \
            above += n_above;                                                                      \
            if (n_in)                                                                              \
                for (int j = 0; j < c; j++)                                                        \
                    if (flag[j])                                                                   \
                        window[w++] = ABS(x[e0 + j]);                                              \
        }                                                                                          \
        *n_window = w;                                                                             \
        return above;                                                                              \
    }                                                                                              \
                                                                                                   \
    CLONES void loramix_elect_##SUF(int n, const T *const *xs, const T *lam, const T *w,          \
                                    int mass, int by_count, T *out, int64_t m)                    \
    {                                                                                              \
        T g[CHUNK], num[CHUNK], den[CHUNK];                                                        \
        for (int64_t e0 = 0; e0 < m; e0 += CHUNK) {                                                \
            int c = m - e0 < CHUNK ? (int)(m - e0) : CHUNK;                                        \
            for (int i = 0; i < n; i++) {                                                          \
                const T *x = xs[i] + e0;                                                           \
                T l = lam[i];                                                                      \
                for (int j = 0; j < c; j++) {                                                      \
                    T t = ((x[j] >= -l) & (x[j] <= l)) ? (T)0 : x[j];                                 \
                    T s = mass ? t : (T)((t > 0) - (t < 0));                                       \
                    g[j] = i ? g[j] + s : s;                                                       \
                }                                                                                  \
            }                                                                                      \
            for (int j = 0; j < c; j++) {                                                          \
                g[j] = g[j] >= 0 ? (T)1 : (T)-1;                                                   \
                num[j] = 0;                                                                        \
                den[j] = 0;                                                                        \
            }                                                                                      \
            for (int i = 0; i < n; i++) {                                                          \
                const T *x = xs[i] + e0;                                                           \
                T l = lam[i], wi = w[i];                                                           \
                for (int j = 0; j < c; j++) {                                                      \
                    T t = ((x[j] >= -l) & (x[j] <= l)) ? (T)0 : x[j];                                 \
                    T y = t * g[j];                                                                \
                    y = y < 0 ? (T)0 : y;                                                          \
                    num[j] = num[j] + y;                                                           \
                    T s = (T)((y > 0) - (y < 0));                                                  \
                    den[j] = by_count ? den[j] + s : den[j] + wi * s;                              \
                }                                                                                  \
            }                                                                                      \
            for (int j = 0; j < c; j++) {                                                          \
                T d = by_count ? (den[j] < 1 ? (T)1 : den[j]) : (den[j] == 0 ? (T)1 : den[j]);     \
                out[e0 + j] = num[j] * g[j] / d;                                                   \
            }                                                                                      \
        }                                                                                          \
    }

KERNELS(float, int32_t, f32, fabsf)
KERNELS(double, int64_t, f64, fabs)
