/*
 * The streaming merge's last step for a bfloat16 weight (loramix.engine's
 * add_delta), fused: out = bf16(f32(w0) + d), and whether every result is
 * finite, in one pass over a block instead of torch's four (widen w0 into a
 * float32 block, add the delta, narrow it back, sum it for the check).
 *
 *   f32(w0):  the bits w0 << 16 (exact, as torch widens);
 *   w0 + d:   one IEEE float32 addition, rounded to nearest (C11,
 *             -ffp-contract=off: nothing fused into it);
 *   bf16(s):  round to nearest, ties to even, on the bits, as torch narrows:
 *             (b + 0x7fff + ((b >> 16) & 1)) >> 16, which also carries the
 *             largest floats up to infinity. A NaN becomes 0x7fc0; it never
 *             reaches a file: the result is then not finite and the caller
 *             raises, naming the tensor.
 * Returns 1 when some result is NaN or infinite (its exponent bits all set),
 * else 0. out may be w0 (each entry is read before it is written).
 *
 * The portable loop is what the compiler vectorises (256 bits wide at most);
 * where the CPU has AVX-512 the same operations run 16 lanes at a time, with
 * the checks as masks: about twice as fast on data in the cache.
 */
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(LORAMIX_ONE_FORM)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

CLONES int loramix_add_bf16_generic(const uint16_t *w0, const float *d, uint16_t *out, int64_t m)
{
    uint32_t bad = 0;
    for (int64_t j = 0; j < m; j++) {
        uint32_t wb = (uint32_t)w0[j] << 16, b;
        float w, s;
        memcpy(&w, &wb, 4);
        s = w + d[j];
        memcpy(&b, &s, 4);
        uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
        r = (b & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r;
        bad |= (r & 0x7f80u) == 0x7f80u;
        out[j] = (uint16_t)r;
    }
    return bad != 0;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

/* the portable loop's operations on 16 lanes: w0 widened (vpmovzxwd) and shifted,
 * one vaddps, the rounding on the bits, a NaN's lanes set to 0x7fc0 and the
 * results narrowed (vpmovdw); the whole vectors here, the rest by the portable loop */
__attribute__((target("avx512f"))) static int add_bf16_avx512(const uint16_t *w0, const float *d,
                                                               uint16_t *out, int64_t m)
{
    const __m512i half = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
    const __m512i abs = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    const __m512i exp = _mm512_set1_epi32(0x7f80), nan = _mm512_set1_epi32(0x7fc0);
    __mmask16 bad = 0;
    int64_t j = 0;
    for (; j + 16 <= m; j += 16) {
        __m512i wb = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w0 + j))), 16);
        __m512i b = _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(wb), _mm512_loadu_ps(d + j)));
        __m512i r = _mm512_add_epi32(_mm512_add_epi32(b, half), _mm512_and_si512(_mm512_srli_epi32(b, 16), one));
        r = _mm512_srli_epi32(r, 16);
        r = _mm512_mask_mov_epi32(r, _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, abs), inf), nan);
        bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(r, exp), exp);
        _mm256_storeu_si256((__m256i *)(out + j), _mm512_cvtepi32_epi16(r));
    }
    return (bad != 0) | (j < m ? loramix_add_bf16_generic(w0 + j, d + j, out + j, m - j) : 0);
}
#endif

int loramix_add_bf16(const uint16_t *w0, const float *d, uint16_t *out, int64_t m)
{
#if defined(__GNUC__) && defined(__x86_64__)
    if (__builtin_cpu_supports("avx512f"))
        return add_bf16_avx512(w0, d, out, m);
#endif
    return loramix_add_bf16_generic(w0, d, out, m);
}
