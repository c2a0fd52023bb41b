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
 */
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

CLONES int loramix_add_bf16(const uint16_t *w0, const float *d, uint16_t *out, int64_t m)
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
