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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* The next min(want, words left before a twist) words of g's state at *w,
 * taken (g moves past them); twists first where none are left. Each caller's
 * loop over them is its own, so that the draws vectorise with its work. */
static inline int64_t take(mt19937 *g, int64_t want, const uint32_t **w)
{
    if (g->i == N)
        mt_twist(g);
    int64_t c = want < N - g->i ? want : N - g->i;
    *w = g->s + g->i;
    g->i += (int)c;
    return c;
}

/* a state word as torch.rand's float32 value: its tempered low 24 bits / 2^24 */
static inline float uniform(uint32_t w)
{
    return (float)(temper(w) & 0xffffffu) * 0x1p-24f;
}

/* the generator at a state of loramix_dare_states (N words and its index) */
static void from_state(mt19937 *g, const uint32_t *state, int32_t i)
{
    for (int j = 0; j < N; j++)
        g->s[j] = state[j];
    g->i = i;
}

/* out[0 .. m) = the keep-mask (1.0f / 0.0f) of the generator seeded with seed */
void loramix_dare_mask_f32(uint64_t seed, float density, float *out, int64_t m)
{
    mt19937 g;
    mt_seed(&g, (uint32_t)seed);
    for (int64_t e = 0; e < m;) {
        const uint32_t *w;
        int64_t c = take(&g, m - e, &w);
        for (int64_t j = 0; j < c; j++)
            out[e + j] = uniform(w[j]) < density ? 1.0f : 0.0f;
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
        const uint32_t *w;
        int64_t c = take(g, m - e, &w);
        float *y = x + e;
        for (int64_t j = 0; j < c; j++)
            y[j] = (y[j] * (uniform(w[j]) < density ? 1.0f : 0.0f)) / density;
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
    from_state(&g, state, i);
    drop(&g, density, x, m);
}

/*
 * DELLA's keep (loramix.methods.della.della_prune_), drawn as torch draws it:
 *
 *     order = |x|.view(int32).argsort(dim=1)       per row, ascending
 *     p[r, order[r, k]] = table[k]                  table: the n keep probabilities by rank
 *     x *= torch.bernoulli(p, generator=g)          one draw per entry, row after row
 *
 * torch.bernoulli with a float32 p draws u as torch.rand does (above) and
 * keeps where u < p; x = x * 1.0f or x * 0.0f is torch's x.mul_(keep).
 *
 * The ranks. torch's CPU argsort is libstdc++'s std::sort (an introsort, not
 * stable) on (key, index) pairs compared by key: equal magnitudes end up in
 * an order of its own. No row is sorted here unless that order matters.
 * The table rises with the rank, so an entry is kept where u < table[lo]
 * and dropped where u >= table[hi - 1] for any rank it may have in [lo, hi).
 * One count of the keys' leading bits (the bits of |x| as int32, whose order
 * is the magnitudes') bounds each entry's rank by its bucket's, and that
 * decides all but a few entries of a row (keep_by_bounds, below). Those few
 * are ranked exactly, stably (equal keys in column order): torch's rank
 * except within a group of equal magnitudes, whose ranks lo .. hi-1 are the
 * same set in both, perhaps given out otherwise. That can change an entry's
 * keep only where its draw u lies in [table[lo], table[hi - 1]), and only
 * for a nonzero magnitude (a zero entry stays the zero it was, +0 * keep =
 * +0, -0 * keep = -0); such an entry is among the few (its group lies in
 * its bucket). Where one is, the row is ranked again by std::sort's own
 * steps (below, written from libstdc++'s algorithm: median of three,
 * unguarded partition, heap sort past 2 log2 n levels, insertion sort of
 * the runs of 16), which give torch's order. With 4096 float32 columns a
 * fifth of the rows have two equal magnitudes and about 1 in 10^4 of those
 * is ranked again.
 * tests/test_native.py checks the whole against torch, ties and all.
 */

/* std::sort on (key, index) pairs compared by key alone, as libstdc++ runs it */
typedef struct { uint32_t k; int32_t i; } kv;
#define LESS(a, b) ((a).k < (b).k)
static void swap_kv(kv *a, kv *b) { kv t = *a; *a = *b; *b = t; }

static void unguarded_linear_insert(kv *last)
{
    kv val = *last;
    kv *next = last - 1;
    while (LESS(val, *next)) {
        *last = *next;
        last = next;
        --next;
    }
    *last = val;
}

static void insertion_sort(kv *first, kv *last)
{
    if (first == last)
        return;
    for (kv *i = first + 1; i != last; ++i) {
        if (LESS(*i, *first)) {
            kv val = *i;
            memmove(first + 1, first, (size_t)(i - first) * sizeof(kv));
            *first = val;
        } else {
            unguarded_linear_insert(i);
        }
    }
}

static void push_heap_kv(kv *first, int64_t hole, int64_t top, kv value)
{
    int64_t parent = (hole - 1) / 2;
    while (hole > top && LESS(first[parent], value)) {
        first[hole] = first[parent];
        hole = parent;
        parent = (hole - 1) / 2;
    }
    first[hole] = value;
}

static void adjust_heap(kv *first, int64_t hole, int64_t len, kv value)
{
    const int64_t top = hole;
    int64_t child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (LESS(first[child], first[child - 1]))
            child--;
        first[hole] = first[child];
        hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        first[hole] = first[child - 1];
        hole = child - 1;
    }
    push_heap_kv(first, hole, top, value);
}

static void heap_sort(kv *first, kv *last)
{
    int64_t len = last - first;
    if (len >= 2)
        for (int64_t parent = (len - 2) / 2;; parent--) {
            adjust_heap(first, parent, len, first[parent]);
            if (parent == 0)
                break;
        }
    while (last - first > 1) {
        --last;
        kv value = *last;
        *last = *first;
        adjust_heap(first, 0, last - first, value);
    }
}

static void move_median_to_first(kv *result, kv *a, kv *b, kv *c)
{
    if (LESS(*a, *b)) {
        if (LESS(*b, *c))
            swap_kv(result, b);
        else if (LESS(*a, *c))
            swap_kv(result, c);
        else
            swap_kv(result, a);
    } else if (LESS(*a, *c))
        swap_kv(result, a);
    else if (LESS(*b, *c))
        swap_kv(result, c);
    else
        swap_kv(result, b);
}

static kv *unguarded_partition(kv *first, kv *last, kv *pivot)
{
    for (;;) {
        while (LESS(*first, *pivot))
            ++first;
        --last;
        while (LESS(*pivot, *last))
            --last;
        if (!(first < last))
            return first;
        swap_kv(first, last);
        ++first;
    }
}

static void introsort_loop(kv *first, kv *last, int64_t depth)
{
    while (last - first > 16) {
        if (depth == 0) {
            heap_sort(first, last);
            return;
        }
        --depth;
        kv *mid = first + (last - first) / 2;
        move_median_to_first(first, first + 1, mid, last - 1);
        kv *cut = unguarded_partition(first + 1, last, first);
        introsort_loop(cut, last, depth);
        last = cut;
    }
}

static void std_sort(kv *first, kv *last)
{
    int64_t n = last - first;
    if (n == 0)
        return;
    int lg = 63 - __builtin_clzll((unsigned long long)n);
    introsort_loop(first, last, 2 * (int64_t)lg);
    if (n > 16) {
        insertion_sort(first, first + 16);
        for (kv *i = first + 16; i != last; ++i)
            unguarded_linear_insert(i);
    } else {
        insertion_sort(first, last);
    }
}

/* the row's ranks by std::sort: rank[c] = place of entry c */
static void rank_as_torch(const float *x, int64_t n, int32_t *rank, kv *pairs)
{
    for (int64_t c = 0; c < n; c++) {
        memcpy(&pairs[c].k, x + c, sizeof(uint32_t));
        pairs[c].k &= 0x7fffffffu;
        pairs[c].i = (int32_t)c;
    }
    std_sort(pairs, pairs + n);
    for (int64_t k = 0; k < n; k++)
        rank[pairs[k].i] = (int32_t)k;
}

/* rank[0 .. n) = the ranks of rank_as_torch, for loramix to check once per
   process that they are torch's own (a torch built with another C++ library
   sorts otherwise: then DELLA takes torch's way). Returns -1 where the work
   memory could not be had, else 0. */
int64_t loramix_della_torch_ranks(const float *x, int64_t n, int32_t *rank)
{
    kv *pairs = malloc((size_t)n * sizeof(kv) + 1);
    if (pairs == NULL)
        return -1;
    rank_as_torch(x, n, rank, pairs);
    free(pairs);
    return 0;
}

/* The bounds. With DIGIT 17 the buckets are 1/64 of an octave of |x|
 * (BUCKETS of them, only the used ones looked at); a row of 4096 normal
 * values leaves about 4.5 entries open (a draw between its bucket's least
 * and greatest probability), each ranked by one pass over the row's keys:
 * about 3.5x faster than the three-pass radix sort of every row that this
 * replaced, and the same keeps. */
#define DIGIT 17
#define BUCKETS (1u << (31 - DIGIT))

/* m by a load: int-to-float conversion would make each entry wait on the last (it merges into a register) */
static const float keep_open[3] = {0.0f, 1.0f, 2.0f};

/* bounds() from entry c on, the open entries appended to pos from e on; returns the new e */
static int64_t bounds_from(const uint32_t *key, const float *u, const float *lo, const float *hi, float *m,
                           int64_t c, int64_t n, int32_t *pos, int64_t e)
{
    for (; c < n; c++) {
        uint32_t b = key[c] >> DIGIT;
        int kept = u[c] < lo[b], open = !kept & (u[c] < hi[b]); /* no branch on a draw */
        m[c] = keep_open[kept + 2 * open];
        pos[e] = (int32_t)c; /* e <= c: inside pos */
        e += open;
    }
    return e;
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(LORAMIX_ONE_FORM)
#include <immintrin.h>
/* Sixteen entries at a time (the compiler leaves the loop scalar, its
   gathers). The table runs from table[0] to table[n - 1], so a draw below
   the first keeps its entry and one at or above the last drops it whatever
   the bucket: with DELLA's default epsilon of 0.15 that decides about 70% of
   the entries without a look-up. Only the others, appended to pos, look up
   their bucket's bounds, one at a time: two gathers of sixteen for every
   vector cost about twice as much (0.85 against 0.45 ns an entry, in a
   loop of its own on a Zen 4). The append is a compress into a register and a whole store:
   at most c entries precede the vector at c, so it stays inside pos's n
   words (the compress store to memory is microcoded on Zen 4). pos then
   keeps the open ones, in place. */
__attribute__((target("avx512f,popcnt"))) static int64_t bounds_avx512(const uint32_t *key, const float *u,
                                                                       const float *lo, const float *hi, float *m,
                                                                       int64_t n, float first, float last,
                                                                       int32_t *pos)
{
    const __m512 one = _mm512_set1_ps(1.0f), low = _mm512_set1_ps(first), high = _mm512_set1_ps(last);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t c = 0, e = 0;
    for (; c + 16 <= n; c += 16) {
        __m512 uc = _mm512_loadu_ps(u + c);
        __mmask16 kept = _mm512_cmp_ps_mask(uc, low, _CMP_LT_OQ);
        __mmask16 look = _mm512_cmp_ps_mask(uc, high, _CMP_LT_OQ) & (__mmask16)~kept;
        _mm512_storeu_ps(m + c, _mm512_maskz_mov_ps(kept, one));
        __m512i at = _mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)c));
        _mm512_storeu_si512(pos + e, _mm512_maskz_compress_epi32(look, at));
        e += __builtin_popcount(look);
    }
    int64_t opened = 0;
    for (int64_t i = 0; i < e; i++) {
        int32_t k = pos[i];
        uint32_t b = key[k] >> DIGIT;
        int kept = u[k] < lo[b], open = !kept & (u[k] < hi[b]);
        m[k] = keep_open[kept + 2 * open];
        pos[opened] = k; /* opened <= i */
        opened += open;
    }
    return bounds_from(key, u, lo, hi, m, c, n, pos, opened);
}
#endif

/* m[c] = 1.0f where entry c is kept whatever its rank in its bucket, 0.0f
   where it is dropped so, 2.0f where its bucket's ranks straddle its draw
   (lo[b], hi[b]: the table at bucket b's least and greatest rank; first,
   last: the table's ends). Returns how many are open, their columns in
   order in pos (n words). */
static int64_t bounds(const uint32_t *key, const float *u, const float *lo, const float *hi, float *m, int64_t n,
                      float first, float last, int32_t *pos)
{
#if defined(__GNUC__) && defined(__x86_64__) && !defined(LORAMIX_ONE_FORM)
    if (__builtin_cpu_supports("avx512f"))
        return bounds_avx512(key, u, lo, hi, m, n, first, last, pos);
#endif
    (void)first, (void)last;
    return bounds_from(key, u, lo, hi, m, 0, n, pos, 0);
}

/* m[c] = the keep of entry c by its stable rank (equal keys in column
   order); 0 where equal magnitudes around it decide its keep, else 1 */
static inline int rank_one(const uint32_t *key, const float *u, const float *table, float *m, int64_t c, int64_t n)
{
    uint32_t kc = key[c];
    int32_t below = 0, before = 0, equal = 1; /* n < 2^31: sixteen lanes at a time */
    for (int64_t j = 0; j < c; j++) {
        below += key[j] < kc;
        before += key[j] == kc;
    }
    for (int64_t j = c + 1; j < n; j++) {
        below += key[j] < kc;
        equal += key[j] == kc;
    }
    equal += before;
    if (equal > 1 && kc != 0 && !(u[c] < table[below]) && u[c] < table[below + equal - 1])
        return 0;
    m[c] = (float)(u[c] < table[below + before]);
    return 1;
}

/* m[c] = the keep (1.0f / 0.0f) of entry c of the row x with draw u[c];
   returns 0 where the order of equal magnitudes decides a keep (the row is
   then ranked by std::sort), else 1. key: n words of work; count: BUCKETS
   words, all zero on entry and left so; lo, hi: BUCKETS floats of work;
   pos: n words of work. */
CLONES static int keep_by_bounds(const float *x, const float *u, const float *table, int64_t n, uint32_t *key,
                                 float *m, uint32_t *count, float *lo, float *hi, int32_t *pos)
{
    uint32_t least = 0xffffffffu, most = 0;
    for (int64_t c = 0; c < n; c++) {
        uint32_t k;
        memcpy(&k, x + c, sizeof k);
        k &= 0x7fffffffu;
        key[c] = k;
        least = k < least ? k : least;
        most = k > most ? k : most;
    }
    for (int64_t c = 0; c < n; c++) /* a loop of its own: beside the keys' stores it ran slower */
        count[key[c] >> DIGIT]++;
    /* each used bucket's least and greatest rank looked up, its count cleared */
    uint32_t below = 0;
    for (uint32_t b = least >> DIGIT; b <= most >> DIGIT; b++) {
        uint32_t k = count[b];
        count[b] = 0;
        lo[b] = table[below];
        hi[b] = table[below + k - (k > 0)]; /* an empty bucket's: never looked up */
        below += k;
    }
    int64_t opened = bounds(key, u, lo, hi, m, n, table[0], table[n - 1], pos);
    for (int64_t i = 0; i < opened; i++) /* about one entry in 900 */
        if (!rank_one(key, u, table, m, pos[i], n))
            return 0;
    return 1;
}

/* u[0 .. n) = the next n draws of g as torch.rand's float32 values */
CLONES static void draw_row(mt19937 *g, float *u, int64_t n)
{
    for (int64_t e = 0; e < n;) {
        const uint32_t *w;
        int64_t c = take(g, n - e, &w);
        for (int64_t j = 0; j < c; j++)
            u[e + j] = uniform(w[j]);
        e += c;
    }
}

/* x[c] *= m[c] = (u[c] < table[rank[c]]) */
CLONES static void keep_row(const float *restrict u, const float *restrict table, const int32_t *restrict rank,
                            float *restrict x, float *restrict m, int64_t n)
{
    for (int64_t c = 0; c < n; c++) {
        m[c] = (float)(u[c] < table[rank[c]]);
        x[c] = x[c] * m[c];
    }
}

/* numpy's np.add.reduce of a float32 row, the same bits: pairwise, eight
   running sums in each block of up to 128 entries (numpy's pairwise_sum) */
static float pairwise_sum(const float *a, int64_t n)
{
    if (n < 8) {
        float s = 0.0f;
        for (int64_t i = 0; i < n; i++)
            s += a[i];
        return s;
    }
    if (n <= 128) {
        float r[8];
        for (int j = 0; j < 8; j++)
            r[j] = a[j];
        int64_t i = 8;
        for (; i < n - n % 8; i += 8)
            for (int j = 0; j < 8; j++)
                r[j] += a[i + j];
        float s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++)
            s += a[i];
        return s;
    }
    int64_t half = n / 2;
    half -= half % 8;
    return pairwise_sum(a, half) + pairwise_sum(a + half, n - half);
}

/* A keep as bits: bit c % 8 of byte c / 8 for entry c of a row. Sixteen
 * entries at a time with AVX-512 (a comparison's mask is those two bytes,
 * little-endian); the portable loops a byte at a time. */
static void pack_from(const float *m, uint8_t *bits, int64_t c, int64_t n)
{
    for (; c + 8 <= n; c += 8) {
        unsigned v = 0;
        for (int k = 0; k < 8; k++)
            v |= (unsigned)(m[c + k] != 0.0f) << k;
        bits[c >> 3] = (uint8_t)v;
    }
    if (c < n) {
        unsigned v = 0;
        for (int k = 0; c + k < n; k++)
            v |= (unsigned)(m[c + k] != 0.0f) << k;
        bits[c >> 3] = (uint8_t)v;
    }
}

/* row[c] = row[c] * keep_c (1.0f or 0.0f), then * scale where scaled, for the entries from c on */
static const float bit_value[2] = {0.0f, 1.0f};
static void apply_from(const uint8_t *bits, float *row, int64_t c, int64_t n, float scale, int scaled)
{
    for (; c < n; c++) {
        float v = row[c] * bit_value[(bits[c >> 3] >> (c & 7)) & 1];
        row[c] = scaled ? v * scale : v;
    }
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(LORAMIX_ONE_FORM)
__attribute__((target("avx512f"))) static void pack_avx512(const float *m, uint8_t *bits, int64_t n)
{
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
        uint16_t k = _mm512_cmp_ps_mask(_mm512_loadu_ps(m + c), _mm512_setzero_ps(), _CMP_NEQ_OQ);
        memcpy(bits + (c >> 3), &k, sizeof k);
    }
    pack_from(m, bits, c, n);
}

__attribute__((target("avx512f"))) static void apply_avx512(const uint8_t *bits, float *row, int64_t n, float scale,
                                                            int scaled)
{
    const __m512 one = _mm512_set1_ps(1.0f), s = _mm512_set1_ps(scale);
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
        uint16_t k;
        memcpy(&k, bits + (c >> 3), sizeof k);
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(row + c), _mm512_maskz_mov_ps(k, one));
        _mm512_storeu_ps(row + c, scaled ? _mm512_mul_ps(v, s) : v);
    }
    apply_from(bits, row, c, n, scale, scaled);
}
#endif

static void pack_row(const float *m, uint8_t *bits, int64_t n)
{
#if defined(__GNUC__) && defined(__x86_64__) && !defined(LORAMIX_ONE_FORM)
    if (__builtin_cpu_supports("avx512f")) {
        pack_avx512(m, bits, n);
        return;
    }
#endif
    pack_from(m, bits, 0, n);
}

/* numpy's sum of |row| (as della.l1_norm sums each row), with work for |row| */
static float l1_row(const float *row, float *work, int64_t n)
{
    for (int64_t c = 0; c < n; c++)
        work[c] = fabsf(row[c]);
    return pairwise_sum(work, n);
}

/* DELLA's keep of the rows (rows, n) of x in place, the draws from a state
 * of loramix_dare_states on (that of the block's first entry); where before
 * and after are not NULL, each row's L1 norm before and after the keep as
 * numpy sums it (the rescale's norms, without two more readings of x); where
 * bits is not NULL, the keep itself: bit c % 8 of byte c / 8 of row r's
 * (n + 7) / 8 bytes set where entry c is kept (loramix_della_apply applies
 * it again to the same entries formed anew). Returns the number of rows
 * ranked by std::sort's steps, or -1 where the work memory could not be had
 * (nothing done). */
int64_t loramix_della_keep_from(const uint32_t *state, int32_t i, const float *table, float *x, int64_t rows,
                                int64_t n, float *before, float *after, uint8_t *bits)
{
    if (rows <= 0 || n <= 0)
        return 0; /* nothing to keep */
    uint32_t *work = calloc((size_t)n * 6 + 3 * (size_t)BUCKETS, sizeof(uint32_t));
    if (work == NULL)
        return -1;
    uint32_t *key = work;
    float *u = (float *)(work + n), *m = (float *)(work + 2 * n);
    int32_t *rank = (int32_t *)(work + 3 * n);
    kv *pairs = (kv *)(work + 4 * n);
    uint32_t *at = work + 6 * n;
    float *lo = (float *)(at + BUCKETS), *hi = (float *)(at + 2 * BUCKETS);
    mt19937 g;
    from_state(&g, state, i);
    int64_t again = 0, stride = (n + 7) / 8;
    for (int64_t r = 0; r < rows; r++) {
        float *row = x + r * n;
        if (before != NULL)
            before[r] = l1_row(row, m, n);
        draw_row(&g, u, n);
        if (keep_by_bounds(row, u, table, n, key, m, at, lo, hi, rank)) { /* rank: work until a sort */
            for (int64_t c = 0; c < n; c++)
                row[c] = row[c] * m[c];
        } else {
            rank_as_torch(row, n, rank, pairs);
            keep_row(u, table, rank, row, m, n);
            again++;
        }
        if (bits != NULL) /* m: 1.0f kept, 0.0f dropped; packed before the after-sum reuses m as work */
            pack_row(m, bits + r * stride, n);
        if (after != NULL)
            after[r] = l1_row(row, m, n);
    }
    free(work);
    return again;
}

/* x = x * keep (1.0f or 0.0f, by bit c % 8 of byte c / 8 of each row's
 * (n + 7) / 8 bytes of bits, as loramix_della_keep_from wrote them), then
 * x * scale where scaled: the bits of that keep and of torch's x.mul_(scale)
 * after it (a float32 scalar), on the rows (rows, n) of x formed anew. */
void loramix_della_apply(const uint8_t *bits, float *x, int64_t rows, int64_t n, float scale, int scaled)
{
    int64_t stride = (n + 7) / 8;
#if defined(__GNUC__) && defined(__x86_64__) && !defined(LORAMIX_ONE_FORM)
    if (__builtin_cpu_supports("avx512f")) {
        for (int64_t r = 0; r < rows; r++)
            apply_avx512(bits + r * stride, x + r * n, n, scale, scaled);
        return;
    }
#endif
    for (int64_t r = 0; r < rows; r++)
        apply_from(bits + r * stride, x + r * n, 0, n, scale, scaled);
}
