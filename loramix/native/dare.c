/*
 * DARE's keep-mask, drawn as torch draws it: loramix.methods.base.dare_mask is
 *
 *     g = torch.Generator().manual_seed(seed)
 *     torch.rand(m, generator=g, dtype=torch.float32).lt_(density)
 *
 * and torch's CPU generator is the standard 32-bit Mersenne Twister (MT19937)
 * seeded with the seed's low 32 bits (the reference initialisation); rand
 * draws one 32-bit output per entry, in order, and keeps its low 24 bits:
 * u = (v & 0xffffff) * 2^-24, exact in float32. The comparison is u < density
 * in float32 (torch casts the Python float to the tensor's dtype). So the mask
 * is 1.0f where (v & 0xffffff) * 2^-24 < density32, else 0.0f: the same bits
 * as the torch code (tests/test_native.py checks it against torch.rand), at a
 * fraction of its cost (torch calls the generator once per entry through its
 * dispatch; this loop is one tempering and one compare).
 */
#include <stdint.h>

/* the twist and the drop in AVX-512 or AVX2 where the CPU has them: integer
   operations and IEEE float32 multiplies and divides, lane for lane the
   same bits as the baseline code, only more at a time */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(LORAMIX_ONE_FORM)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define N 624
#define M 397

typedef struct {
    uint32_t s[N];
    int i;
} mt19937;

static void mt_seed(mt19937 *g, uint32_t seed)
{
    g->s[0] = seed;
    for (int j = 1; j < N; j++)
        g->s[j] = 1812433253u * (g->s[j - 1] ^ (g->s[j - 1] >> 30)) + (uint32_t)j;
    g->i = N;
}

#define TWIST(j, j1, jm)                                                                         \
    do {                                                                                         \
        uint32_t y = (s[j] & 0x80000000u) | (s[j1] & 0x7fffffffu);                               \
        s[j] = s[jm] ^ (y >> 1) ^ (-(y & 1u) & 0x9908b0dfu);                                     \
    } while (0)

/* the next N words of state (the reference algorithm, its index wrap-around split out) */
CLONES static void mt_twist(mt19937 *g)
{
    uint32_t *s = g->s;
    int j = 0;
    for (; j < N - M; j++)
        TWIST(j, j + 1, j + M);
    for (; j < N - 1; j++)
        TWIST(j, j + 1, j + M - N);
    TWIST(N - 1, 0, M - 1);
    g->i = 0;
}

static inline uint32_t temper(uint32_t y)
{
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

/* out[0 .. m) = the keep-mask (1.0f / 0.0f) of the generator seeded with seed */
void loramix_dare_mask_f32(uint64_t seed, float density, float *out, int64_t m)
{
    mt19937 g;
    mt_seed(&g, (uint32_t)seed);
    for (int64_t e = 0; e < m;) {
        if (g.i == N)
            mt_twist(&g);
        int64_t c = m - e < N - g.i ? m - e : N - g.i;
        const uint32_t *s = g.s + g.i;
        for (int64_t j = 0; j < c; j++) {
            float u = (float)(temper(s[j]) & 0xffffffu) * 0x1p-24f;
            out[e + j] = u < density ? 1.0f : 0.0f;
        }
        g.i += (int)c;
        e += c;
    }
}

/* x[0 .. m) = (x * mask) / density in place, the mask the next m draws of g:
 * what torch.Tensor.mul_(mask).div_(density) gives a float32 x, bit for bit
 * (a dropped entry is x * 0.0f, -0 for a negative x and NaN for an infinite
 * one, divided like the others), in one reading of x and without the mask in
 * memory (tests/test_native.py checks it against torch). */
CLONES static void drop(mt19937 *g, float density, float *x, int64_t m)
{
    for (int64_t e = 0; e < m;) {
        if (g->i == N)
            mt_twist(g);
        int64_t c = m - e < N - g->i ? m - e : N - g->i;
        const uint32_t *s = g->s + g->i;
        float *y = x + e;
        for (int64_t j = 0; j < c; j++) {
            float u = (float)(temper(s[j]) & 0xffffffu) * 0x1p-24f;
            y[j] = (y[j] * (u < density ? 1.0f : 0.0f)) / density;
        }
        g->i += (int)c;
        e += c;
    }
}

/* drop() with the mask of the generator seeded with seed, from its first draw */
void loramix_dare_drop_f32(uint64_t seed, float density, float *x, int64_t m)
{
    mt19937 g;
    mt_seed(&g, (uint32_t)seed);
    drop(&g, density, x, m);
}

/* The generator seeded with seed where its draw at[k] is next, for k < n (at
 * increasing): its N words into states + k N and its index into idx[k]. Only
 * the twists run (no tempering): a mask can then be drawn from any of these
 * places, by blocks in any order or on several threads, with the draws of one
 * run from the start. Draw a (0-based) is word a mod N after a / N + 1 twists. */
void loramix_dare_states(uint64_t seed, const int64_t *at, int64_t n, uint32_t *states, int32_t *idx)
{
    mt19937 g;
    mt_seed(&g, (uint32_t)seed);
    int64_t twists = 0;
    for (int64_t k = 0; k < n; k++) {
        for (; twists < at[k] / N + 1; twists++)
            mt_twist(&g);
        for (int j = 0; j < N; j++)
            states[k * N + j] = g.s[j];
        idx[k] = (int32_t)(at[k] % N);
    }
}

/* drop() with the mask drawn from a state of loramix_dare_states (N words and its index) */
void loramix_dare_drop_from(const uint32_t *state, int32_t i, float density, float *x, int64_t m)
{
    mt19937 g;
    for (int j = 0; j < N; j++)
        g.s[j] = state[j];
    g.i = i;
    drop(&g, density, x, m);
}
