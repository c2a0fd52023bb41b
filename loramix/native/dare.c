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
 * an order of its own. Each row is first ranked here by an LSD radix sort of
 * the bits of |x| (as int32, non-negative: the order of the magnitudes),
 * stable, about 9x faster: every entry's rank is torch's except within a
 * group of equal magnitudes, whose ranks lo .. hi-1 are the same set in
 * both, perhaps given out otherwise. That can change an entry's keep only
 * where its draw u lies in [min table[lo..hi), max table[lo..hi)), and only
 * for a nonzero magnitude (a zero entry stays the zero it was, +0 * keep =
 * +0, -0 * keep = -0). So the row's draws come first; where one of them
 * lies so, the row is ranked again by std::sort's own steps (below, written
 * from libstdc++'s algorithm: median of three, unguarded partition, heap
 * sort past 2 log2 n levels, insertion sort of the runs of 16), which give
 * torch's order. With 4096 float32 columns a fifth of the rows have two
 * equal magnitudes and about 1 in 10^4 of those is ranked again.
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

/* rank[c] = place of |x_c| in its row sorted ascending (n entries, equal
   ones in column order): three passes of 11 bits (a fifth faster than four
   of 8 at 4096 columns); the row's keys sorted into *keys, and their
   entries into *cols (two of the four work arrays of n words) */
static void rank_stable(const float *x, int64_t n, int32_t *rank, uint32_t *ka, uint32_t *kb, int32_t *ia,
                        int32_t *ib, const uint32_t **keys, const int32_t **cols)
{
    uint32_t hist[3][2048];
    memset(hist, 0, sizeof hist);
    for (int64_t c = 0; c < n; c++) {
        uint32_t k;
        memcpy(&k, x + c, sizeof k);
        k &= 0x7fffffffu;
        ka[c] = k;
        ia[c] = (int32_t)c;
        hist[0][k & 2047u]++;
        hist[1][(k >> 11) & 2047u]++;
        hist[2][k >> 22]++;
    }
    for (int p = 0; p < 3; p++) {
        int shift = 11 * p;
        uint32_t *h = hist[p];
        if (h[(ka[0] >> shift) & 2047u] == (uint32_t)n)
            continue; /* one digit for the whole row: this pass would keep the order */
        uint32_t sum = 0;
        for (int d = 0; d < 2048; d++) {
            uint32_t t = h[d];
            h[d] = sum;
            sum += t;
        }
        for (int64_t c = 0; c < n; c++) {
            uint32_t at = h[(ka[c] >> shift) & 2047u]++;
            kb[at] = ka[c];
            ib[at] = ia[c];
        }
        uint32_t *tk = ka;
        ka = kb;
        kb = tk;
        int32_t *ti = ia;
        ia = ib;
        ib = ti;
    }
    for (int64_t k = 0; k < n; k++)
        rank[ia[k]] = (int32_t)k;
    *keys = ka;
    *cols = ia;
}

/* whether a draw of a nonzero entry among equal magnitudes keeps or drops
   it by which of the group's ranks it gets (see above) */
static int order_matters(const uint32_t *keys, const int32_t *cols, const float *u, const float *table, int64_t n)
{
    for (int64_t lo = 0, hi; lo < n; lo = hi) {
        for (hi = lo + 1; hi < n && keys[hi] == keys[lo]; hi++)
            ;
        if (hi - lo < 2 || keys[lo] == 0)
            continue;
        float least = table[lo], most = table[lo];
        for (int64_t k = lo + 1; k < hi; k++) {
            least = table[k] < least ? table[k] : least;
            most = table[k] > most ? table[k] : most;
        }
        for (int64_t k = lo; k < hi; k++)
            if (!(u[cols[k]] < least) && u[cols[k]] < most)
                return 1;
    }
    return 0;
}

/* u[0 .. n) = the next n draws of g as torch.rand's float32 values */
CLONES static void draw_row(mt19937 *g, float *u, int64_t n)
{
    for (int64_t e = 0; e < n;) {
        if (g->i == N)
            mt_twist(g);
        int64_t c = n - e < N - g->i ? n - e : N - g->i;
        const uint32_t *s = g->s + g->i;
        float *v = u + e;
        for (int64_t j = 0; j < c; j++)
            v[j] = (float)(temper(s[j]) & 0xffffffu) * 0x1p-24f;
        g->i += (int)c;
        e += c;
    }
}

/* x[c] *= (u[c] < table[rank[c]]) */
CLONES static void keep_row(const float *restrict u, const float *restrict table, const int32_t *restrict rank,
                            float *restrict x, int64_t n)
{
    for (int64_t c = 0; c < n; c++)
        x[c] = x[c] * (float)(u[c] < table[rank[c]]);
}

/* DELLA's keep of the rows (rows, n) of x in place, the draws from a state
 * of loramix_dare_states on (that of the block's first entry). Returns the
 * number of rows ranked again by std::sort's steps, or -1 where the work
 * memory could not be had (nothing done). */
int64_t loramix_della_keep_from(const uint32_t *state, int32_t i, const float *table, float *x, int64_t rows,
                                int64_t n)
{
    if (rows <= 0 || n <= 0)
        return 0; /* nothing to keep (and rank_stable reads a first key) */
    uint32_t *work = malloc((size_t)n * 8 * sizeof(uint32_t));
    if (work == NULL)
        return -1;
    int32_t *rank = (int32_t *)work;
    uint32_t *ka = work + n, *kb = work + 2 * n;
    int32_t *ia = (int32_t *)(work + 3 * n), *ib = (int32_t *)(work + 4 * n);
    float *u = (float *)(work + 5 * n);
    kv *pairs = (kv *)(work + 6 * n);
    mt19937 g;
    from_state(&g, state, i);
    int64_t again = 0;
    for (int64_t r = 0; r < rows; r++) {
        float *row = x + r * n;
        const uint32_t *keys;
        const int32_t *cols;
        draw_row(&g, u, n);
        rank_stable(row, n, rank, ka, kb, ia, ib, &keys, &cols);
        if (order_matters(keys, cols, u, table, n)) {
            rank_as_torch(row, n, rank, pairs);
            again++;
        }
        keep_row(u, table, rank, row, n);
    }
    free(work);
    return again;
}
