/* Element-wise merge kernel: X = x2 + a * (x0 - x1), rounded once to the output format.
 *
 * Inputs are F32, BF16 or F16 (all decode exactly to fp32); `a` is alpha already rounded to
 * fp32. An absent x1 reads as +0 and an absent x2 as -0, which turns the one formula into
 * every kind: residual (x0 - x1), apply (x2 + a*x0), fused, convert (x0).
 *
 * Exactness. The output is RN_out(X) for the exact real X, by one of three ways:
 *   A (all-BF16, alpha == 1): d = x0 - x1 and s = x2 + d in fp32 with TwoSum errors e1, e2.
 *     When e1 == 0, X = s + e2 exactly and s = RN32(X); rounding s to BF16 is right except on
 *     a BF16 midpoint, where the sign of e2 (or, when it is 0, evenness) decides.
 *   A' (all-BF16, alpha != 1): when e1 == 0, a*d is exact in double, so one double TwoSum
 *     gives X = S + eS; f = RN32(S) has no BF16 midpoint strictly between it and X, and the
 *     side of f that X lies on decides a tie.
 *   B (any dtype and alpha): the products a*x0, a*x1 are exact in double (24 x 24 bits);
 *     TwoSum chains give X = R + eR exactly with R = RN64(X), unless the sum of the rounding
 *     errors is itself inexact (exponent spans beyond ~59 bits). R is rounded to odd (53
 *     bits), then to nearest fp32, then to odd again for BF16/F16 outputs before their
 *     nearest-even cast: RN_p(RO_q(X)) == RN_p(X) whenever q >= p + 2, subnormals included,
 *     because every fp32 number and every BF16/F16 midpoint is "even" in the finer format.
 * A and A' flag what they cannot prove (e1 != 0, non-finite values) and B redoes those;
 * what B cannot prove is reported as hard and evaluated by the caller with rationals.
 *
 * Non-finite inputs give the plain fp32 formula instead (what torch computes); an exact
 * zero takes the sign of that formula's result when it is a zero too, else +0.
 *
 * Build without -ffast-math and with -ffp-contract=off: TwoSum needs every operation
 * rounded as written.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
/* x86-64-v4 brings AVX-512 BW (16-bit lanes in zmm), v3 AVX2 with FMA and F16C.
   GCC learnt arch= clones in version 12. */
#define RL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8
#define RL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#elif defined(__x86_64__) && defined(__clang__) && __clang_major__ >= 14
#define RL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RL_CLONES
#endif
#if defined(__GNUC__)
#define RL_INLINE static inline __attribute__((always_inline))
#else
#define RL_INLINE static inline
#endif

enum { RL_F32 = 0, RL_BF16 = 1, RL_F16 = 2 };
#define RL_BLOCK 256
#define RL_LANES 16
#ifndef RL_AHEAD
#define RL_AHEAD 2048 /* bytes of each stream fetched ahead of the block in work */
#endif

/* ---- bit casts and format conversions ---------------------------------------------- */

RL_INLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
RL_INLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
RL_INLINE uint64_t d2u(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }
RL_INLINE double u2d(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }

RL_INLINE float bf16_decode(uint16_t h) { return u2f((uint32_t)h << 16); }

RL_INLINE float f16_decode(uint16_t h) {
    uint32_t mag = (uint32_t)(h & 0x7FFFu) << 13;
    uint32_t exp = mag & 0x0F800000u;
    uint32_t norm = mag + 0x38000000u;                       /* rebias 15 -> 127 */
    uint32_t special = norm + 0x38000000u;                   /* inf / NaN */
    float sub = u2f(mag + 0x38800000u) - u2f(0x38800000u);   /* mant * 2^-24, exact */
    uint32_t r = exp == 0x0F800000u ? special : (exp == 0 ? f2u(sub) : norm);
    return u2f(r | ((uint32_t)(h & 0x8000u) << 16));
}

/* RNE of fp32 bits; NaN -> 0x7FC0 like c10::BFloat16 (torch's vectorised cast writes 0xFFFF). */
RL_INLINE uint16_t bf16_encode(uint32_t b) {
    uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    return (b & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : (uint16_t)r;
}

/* RNE of fp32 bits incl. subnormals and overflow; NaN quieted, payload kept (as vcvtps2ph). */
RL_INLINE uint16_t f16_encode(uint32_t b) {
    uint32_t sign = (b >> 16) & 0x8000u;
    uint32_t a = b & 0x7FFFFFFFu;
    uint32_t big = a > 0x7F800000u ? (0x7E00u | ((a >> 13) & 0x3FFu)) : 0x7C00u;
    uint32_t sub = f2u(u2f(a) + 0.5f) - 0x3F000000u;          /* the add rounds to 2^-24 */
    uint32_t norm = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    uint32_t r = a >= 0x47800000u ? big : (a < 0x38800000u ? sub : norm);
    return (uint16_t)(r | sign);
}

/* Round to odd: bits is a neighbour of X in its format (nothing representable between
 * them); above / below say X > bits / X < bits. */
RL_INLINE uint32_t odd32(uint32_t bits, int above, int below) {
    uint32_t away = (bits >> 31) ? (uint32_t)below : (uint32_t)above;
    uint32_t step = away ? 1u : 0xFFFFFFFFu;
    return ((above | below) && !(bits & 1u)) ? bits + step : bits;
}

RL_INLINE uint64_t odd64(uint64_t bits, int above, int below) {
    uint64_t away = (bits >> 63) ? (uint64_t)below : (uint64_t)above;
    uint64_t step = away ? 1u : ~(uint64_t)0;
    return ((above | below) && !(bits & 1u)) ? bits + step : bits;
}

/* ---- way B: exact in double, any dtype and alpha ----------------------------------- */

/* Returns the fp32 bits to encode (RN32(X), or RO24(X) when ro24); *s gets the fp32 formula,
 * *hard is set when X could not be pinned down. */
RL_INLINE uint32_t exact_elem(float x0, float x1, float x2, float a, int ro24, float *s,
                              uint32_t *hard) {
    double p0 = (double)a * x0, p1 = (double)a * x1, z = x2, t;
    double d = p0 - p1;
    t = d - p0;
    double ed = (p0 - (d - t)) + (-p1 - t);
    double sum = z + d;
    t = sum - z;
    double es = (z - (sum - t)) + (d - t);
    double tail = es + ed;
    t = tail - es;
    double et = (es - (tail - t)) + (ed - t);
    double r = sum + tail;
    t = r - sum;
    double er = (sum - (r - t)) + (tail - t);
    double rr = u2d(odd64(d2u(r), er > 0.0, er < 0.0));
    float f = (float)rr;
    uint32_t bits = f2u(f);
    if (ro24) {
        double rem = rr - (double)f;
        bits = odd32(bits, rem > 0.0, rem < 0.0);
    }
    float p32 = a * (x0 - x1);
    float s32 = x2 + p32;
    uint32_t finite = ((f2u(x0) & 0x7F800000u) != 0x7F800000u) &
                      ((f2u(x1) & 0x7F800000u) != 0x7F800000u) &
                      ((f2u(x2) & 0x7F800000u) != 0x7F800000u);
    uint32_t zero = s32 == 0.0f ? f2u(s32) : 0u;
    bits = r == 0.0 ? zero : bits;
    *s = s32;
    *hard = finite & (uint32_t)(et != 0.0);
    return finite ? bits : f2u(s32);
}

/* ---- the all-BF16 hot loop (ways A and A', one pass) ------------------------------- */

/* RN_bf16(X) from f, an fp32 value with no BF16 midpoint strictly between it and X, and the
 * side of f that X lies on (above / below): only an f on a BF16 midpoint can round wrongly
 * from f alone, and there the side (or, when X == f, evenness) decides. NaN -> 0x7FC0. */
RL_INLINE uint16_t bf16_round_side(float f, int above, int below) {
    uint32_t b = f2u(f);
    uint32_t away = (b >> 31) ? (uint32_t)below : (uint32_t)above;
    uint32_t up = (above | below) ? away : (b >> 16) & 1u;
    uint16_t r = (uint16_t)((b + 0x7FFFu + up) >> 16);
    return (b & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : r;
}

/* The same for an exact fp32 tail = X - f: its sign bit against f's says the side. */
RL_INLINE uint16_t bf16_round_tail(float f, float tail) {
    uint32_t b = f2u(f);
    uint32_t away = ~(b ^ f2u(tail)) >> 31;
    uint32_t up = tail == 0.0f ? (b >> 16) & 1u : away;
    uint16_t r = (uint16_t)((b + 0x7FFFu + up) >> 16);
    return (b & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : r;
}

/* One element. *hard is set when d = x0 - x1 is inexact in fp32 (or not finite) and, for
 * alpha != 1, when the result is not finite: the caller redoes those with way B, which also
 * gives non-finite inputs their fp32-formula result. */
RL_INLINE uint16_t hot_elem(uint16_t r0, uint16_t r1, uint16_t r2, float a, int has1, int has2,
                            int a_one, float *s, uint32_t *hard) {
    float x0 = bf16_decode(r0), x1 = bf16_decode(r1), x2 = bf16_decode(r2);
    float d = x0, e1 = 0.0f, t;
    if (has1) {
        d = x0 - x1;
        t = d - x0;
        e1 = (x0 - (d - t)) + (-x1 - t);
    }
    uint32_t h = (uint32_t)!(e1 == 0.0f);
    if (a_one) {
        /* X = sum + e2 exactly and sum = RN32(X); a non-finite x2 alone gives the formula's
         * inf or NaN here too. */
        float sum = d, e2 = 0.0f;
        if (has2) {
            sum = x2 + d;
            t = sum - x2;
            e2 = (x2 - (sum - t)) + (d - t);
        }
        *s = sum;
        *hard = h;
        return bf16_round_tail(sum, e2);
    }
    /* a*d is exact in double, so X = sum + es exactly. f = RN32(sum) has no BF16 midpoint
     * strictly between it and X (midpoints are doubles), and X - f has the sign of
     * (sum - f) + es: |sum - f| >= 2|es| whenever it is not 0. An exact zero keeps the
     * formula's sign: the formula's product is then exact too. */
    *s = has2 ? x2 + a * d : a * d;
    double p = (double)a * d, z = x2;
    double sum = p, es = 0.0;
    if (has2) {
        sum = z + p;
        double u = sum - z;
        es = (z - (sum - u)) + (p - u);
    }
    float f = (float)sum;
    double side = (sum - (double)f) + es;
    *hard = h | (uint32_t)((f2u(f) & 0x7F800000u) == 0x7F800000u);
    return bf16_round_side(f, side > 0.0, side < 0.0);
}

RL_INLINE uint32_t hot_body(uint16_t *restrict o, const uint16_t *restrict p0,
                            const uint16_t *restrict p1, const uint16_t *restrict p2, int64_t n,
                            float a, int has1, int has2, int a_one, int stats,
                            float *restrict sbuf) {
    uint32_t any = 0;
    for (int64_t i = 0; i < n; i++) {
        float s;
        uint32_t h;
        uint16_t r1 = has1 ? p1[i] : (uint16_t)0, r2 = has2 ? p2[i] : (uint16_t)0x8000u;
        o[i] = hot_elem(p0[i], r1, r2, a, has1, has2, a_one, &s, &h);
        any |= h;
        if (stats) sbuf[i] = s;
    }
    return any;
}

#define RL_HOT(h1, h2, one) \
    (stats ? hot_body(o, p0, p1, p2, n, a, h1, h2, one, 1, sbuf) \
           : hot_body(o, p0, p1, p2, n, a, h1, h2, one, 0, sbuf))

RL_CLONES
static uint32_t hot_block(uint16_t *o, const uint16_t *p0, const uint16_t *p1,
                          const uint16_t *p2, int64_t n, float a, int stats, float *sbuf) {
    int one = a == 1.0f;
    if (p1 && p2) return one ? RL_HOT(1, 1, 1) : RL_HOT(1, 1, 0);
    if (p2) return one ? RL_HOT(0, 1, 1) : RL_HOT(0, 1, 0);
    return RL_HOT(1, 0, 1); /* residual; the dispatcher sends alpha != 1 elsewhere */
}

/* ---- the generic path: decode a block, compute (way B), encode --------------------- */

RL_CLONES
static void decode(float *restrict x, const void *p, int code, int64_t n, float fill) {
    if (!p) {
        for (int64_t i = 0; i < n; i++) x[i] = fill;
    } else if (code == RL_F32) {
        memcpy(x, p, (size_t)n * 4);
    } else {
        const uint16_t *h = (const uint16_t *)p;
        if (code == RL_BF16)
            for (int64_t i = 0; i < n; i++) x[i] = bf16_decode(h[i]);
        else
            for (int64_t i = 0; i < n; i++) x[i] = f16_decode(h[i]);
    }
}

RL_CLONES
static void encode(void *p, int code, const uint32_t *restrict bits, int64_t n) {
    if (code == RL_F32) {
        memcpy(p, bits, (size_t)n * 4);
        return;
    }
    uint16_t *h = (uint16_t *)p;
    if (code == RL_BF16)
        for (int64_t i = 0; i < n; i++) h[i] = bf16_encode(bits[i]);
    else
        for (int64_t i = 0; i < n; i++) h[i] = f16_encode(bits[i]);
}

RL_INLINE uint32_t generic_body(const float *restrict x0, const float *restrict x1,
                                const float *restrict x2, int64_t n, float a, int ro24,
                                uint32_t *restrict bits, uint32_t *restrict hard,
                                float *restrict sbuf) {
    uint32_t any = 0;
    for (int64_t i = 0; i < n; i++) {
        bits[i] = exact_elem(x0[i], x1[i], x2[i], a, ro24, &sbuf[i], &hard[i]);
        any |= hard[i];
    }
    return any;
}

RL_CLONES
static uint32_t generic_compute(const float *x0, const float *x1, const float *x2, int64_t n,
                                float a, int ro24, uint32_t *bits, uint32_t *hard,
                                float *sbuf) {
    return ro24 ? generic_body(x0, x1, x2, n, a, 1, bits, hard, sbuf)
                : generic_body(x0, x1, x2, n, a, 0, bits, hard, sbuf);
}

/* ---- fp32-formula statistics: fixed lanes, so a call always sums the same way ------- */

typedef struct {
    double sq[RL_LANES];
    float mx[RL_LANES];
} rl_stats;

#if defined(__GNUC__)
/* 32-byte vectors: wider generic vectors are split through the stack on AVX2 targets. */
typedef float rl_f4 __attribute__((vector_size(16)));
typedef double rl_d4 __attribute__((vector_size(32)));
typedef int32_t rl_i8 __attribute__((vector_size(32)));
#endif

/* Fold the lanes of `st` into stats[0] (sum of squares, added) and stats[1] (max |x|). */
static void fold_stats(const rl_stats *st, double *stats) {
    double sq = 0.0;
    float mx = 0.0f;
    for (int j = 0; j < RL_LANES; j++) {
        sq += st->sq[j];
        mx = st->mx[j] > mx ? st->mx[j] : mx;
    }
    stats[0] += sq;
    stats[1] = (double)mx > stats[1] ? (double)mx : stats[1];
}

RL_CLONES
static void add_stats(rl_stats *st, const float *restrict s, int64_t n) {
    int64_t i = 0;
#if defined(__GNUC__)
    /* Explicit vectors: the compiler may not reorder these double sums by itself. Lane j
     * of the 16 takes the elements i with i % 16 == j, as the scalar tail does. */
    rl_d4 q0, q1, q2, q3;
    rl_i8 m0, m1;
    memcpy(&q0, st->sq, sizeof q0);
    memcpy(&q1, st->sq + 4, sizeof q1);
    memcpy(&q2, st->sq + 8, sizeof q2);
    memcpy(&q3, st->sq + 12, sizeof q3);
    memcpy(&m0, st->mx, sizeof m0);
    memcpy(&m1, st->mx + 8, sizeof m1);
    for (; i + RL_LANES <= n; i += RL_LANES) {
        rl_f4 v0, v1, v2, v3;
        rl_i8 a0, a1;
        memcpy(&v0, s + i, sizeof v0);
        memcpy(&v1, s + i + 4, sizeof v1);
        memcpy(&v2, s + i + 8, sizeof v2);
        memcpy(&v3, s + i + 12, sizeof v3);
        rl_d4 w0 = __builtin_convertvector(v0, rl_d4), w1 = __builtin_convertvector(v1, rl_d4);
        rl_d4 w2 = __builtin_convertvector(v2, rl_d4), w3 = __builtin_convertvector(v3, rl_d4);
        q0 += w0 * w0;
        q1 += w1 * w1;
        q2 += w2 * w2;
        q3 += w3 * w3;
        /* |x| as bits: non-negative floats order as their bit patterns do. */
        memcpy(&a0, s + i, sizeof a0);
        memcpy(&a1, s + i + 8, sizeof a1);
        a0 &= 0x7FFFFFFF;
        a1 &= 0x7FFFFFFF;
        rl_i8 k0 = a0 > m0, k1 = a1 > m1;
        m0 = (a0 & k0) | (m0 & ~k0);
        m1 = (a1 & k1) | (m1 & ~k1);
    }
    memcpy(st->sq, &q0, sizeof q0);
    memcpy(st->sq + 4, &q1, sizeof q1);
    memcpy(st->sq + 8, &q2, sizeof q2);
    memcpy(st->sq + 12, &q3, sizeof q3);
    memcpy(st->mx, &m0, sizeof m0);
    memcpy(st->mx + 8, &m1, sizeof m1);
#endif
    for (int j = 0; i < n; i++, j++) {
        float v = s[i], m = v < 0.0f ? -v : v;
        st->sq[j] += (double)v * (double)v;
        st->mx[j] = m > st->mx[j] ? m : st->mx[j];
    }
}

/* ---- driver ------------------------------------------------------------------------ */

static int64_t itemsize(int code) { return code == RL_F32 ? 4 : 2; }

static const void *at(const void *p, int code, int64_t i) {
    return p ? (const char *)p + i * itemsize(code) : NULL;
}

/* Hardware prefetchers alone leave the four streams short of bandwidth. */
static void prefetch(const void *p, int code, int64_t from, int64_t end, int write) {
    if (!p) return;
    int64_t size = itemsize(code);
    const char *lo = (const char *)p + from * size + RL_AHEAD, *hi = (const char *)p + end * size;
    for (int64_t k = 0; k < RL_BLOCK * size && lo + k < hi; k += 64) {
        if (write)
            __builtin_prefetch(lo + k, 1);
        else
            __builtin_prefetch(lo + k, 0);
    }
}

/* Elements of a hot block the fast pass flagged: way B, else reported to the caller. */
static int64_t hot_rescan(uint16_t *o, const uint16_t *p0, const uint16_t *p1,
                          const uint16_t *p2, int64_t base, int64_t n, float a, int64_t *hard) {
    int64_t nh = 0;
    for (int64_t i = 0; i < n; i++) {
        float s;
        uint32_t h;
        uint16_t r1 = p1 ? p1[i] : (uint16_t)0, r2 = p2 ? p2[i] : (uint16_t)0x8000u;
        (void)hot_elem(p0[i], r1, r2, a, 1, 1, a == 1.0f, &s, &h);
        if (!h) continue;
        uint32_t bits = exact_elem(bf16_decode(p0[i]), bf16_decode(r1), bf16_decode(r2), a, 1,
                                   &s, &h);
        if (h)
            hard[nh++] = base + i;
        else
            o[i] = bf16_encode(bits);
    }
    return nh;
}

/* Computes elements [start, end) into out and returns the index it stopped at: `end`, or
 * earlier when the hard-index buffer could overflow (call again from there). Hard element
 * indices (absolute) go to hard[0 .. *n_hard); their outputs are left for the caller.
 * stats (when want_stats) are accumulated: stats[0] += sum of squares, stats[1] = max |s|.
 * Returns -1 for an unknown dtype code. */
int64_t realign_combine(void *out, int32_t out_code, const void *in0, int32_t code0,
                        const void *in1, int32_t code1, const void *in2, int32_t code2,
                        float alpha, int64_t start, int64_t end, int32_t want_stats,
                        double *stats, int64_t *hard, int64_t hard_cap, int64_t *n_hard) {
    const int32_t codes[4] = {out_code, code0, code1, code2};
    for (int k = 0; k < 4; k++)
        if (codes[k] < RL_F32 || codes[k] > RL_F16) return -1;
    int hot = out_code == RL_BF16 && code0 == RL_BF16 && (!in1 || code1 == RL_BF16) &&
              (!in2 || code2 == RL_BF16) && (in1 || in2) && (in2 || alpha == 1.0f);
    float x0[RL_BLOCK], x1[RL_BLOCK], x2[RL_BLOCK], sbuf[RL_BLOCK];
    uint32_t bits[RL_BLOCK], flags[RL_BLOCK];
    rl_stats st;
    memset(&st, 0, sizeof st);
    int64_t nh = 0, b = start;
    while (b < end && nh < hard_cap) {
        int64_t n = end - b, room = hard_cap - nh;
        n = n < RL_BLOCK ? n : RL_BLOCK;
        n = n < room ? n : room;
        uint32_t any;
        prefetch(in0, code0, b, end, 0);
        prefetch(in1, code1, b, end, 0);
        prefetch(in2, code2, b, end, 0);
        prefetch(out, out_code, b, end, 1);
        if (hot) {
            uint16_t *o = (uint16_t *)out + b;
            const uint16_t *p0 = at(in0, code0, b), *p1 = at(in1, code1, b),
                           *p2 = at(in2, code2, b);
            any = hot_block(o, p0, p1, p2, n, alpha, want_stats, sbuf);
            if (any) nh += hot_rescan(o, p0, p1, p2, b, n, alpha, hard + nh);
        } else {
            decode(x0, at(in0, code0, b), code0, n, 0.0f);
            decode(x1, at(in1, code1, b), code1, n, 0.0f);
            decode(x2, at(in2, code2, b), code2, n, -0.0f);
            any = generic_compute(x0, x1, x2, n, alpha, out_code != RL_F32, bits, flags, sbuf);
            encode((char *)out + b * itemsize(out_code), out_code, bits, n);
            for (int64_t i = 0; any && i < n; i++)
                if (flags[i]) hard[nh++] = b + i;
        }
        if (want_stats) add_stats(&st, sbuf, n);
        b += n;
    }
    if (want_stats) fold_stats(&st, stats);
    *n_hard = nh;
    return b;
}

/* ---- exact residual packs: the error of the rounded difference ------------------- */

/* For p = RN_W(x0 - x1) (the residual kind's output, W = code, x0/x1 of the same code),
 * writes neg = -((x0 - x1) - p), which W holds exactly (the error of a rounded sum is
 * representable in the sum's format), so that p - neg == x0 - x1 exactly and a fused merge
 * of (p, neg) gives the bits of the fused merge of (x0, x1). All in fp32, which holds every
 * W value: x0 - x1 = s + e (TwoSum, exact), s - p is exact (Sterbenz: s and p are both the
 * difference rounded, to fp32 and to W), so (s - p) + e is the error rounded once, i.e.
 * exactly. Where p overflowed (|x0 - x1| beyond W's range) the pair itself is stored:
 * p = x0, neg = x1. x0 and x1 may be of narrower types than W (codes code0, code1): they
 * widen exactly. Non-finite inputs keep p and get neg = +0; a zero error is +0.
 * Returns how many neg elements are not +0 (how sparse the corrections are). */
/* One block, branch-free so that it vectorises; returns the count of non-zero neg bits and
 * sets *any when an element overflowed. */
RL_CLONES
static int64_t split_block(const float *restrict x0, const float *restrict x1,
                           const float *restrict pv, int64_t m, uint32_t *restrict bits,
                           uint32_t *restrict over, uint32_t *any) {
    int64_t nonzero = 0;
    uint32_t seen = 0;
    for (int64_t i = 0; i < m; i++) {
        float a = x0[i], c = x1[i], p = pv[i];
        float s = a - c, bb = s - a;
        float e = (a - (s - bb)) + (-c - bb);
        float ne = -((s - p) + e);
        uint32_t ua = f2u(a), uc = f2u(c), up = f2u(p), un = f2u(ne);
        uint32_t fin = ((ua & 0x7F800000u) != 0x7F800000u) & ((uc & 0x7F800000u) != 0x7F800000u);
        uint32_t ov = fin & ((up & 0x7F800000u) == 0x7F800000u);
        uint32_t keep = fin & ((un & 0x7FFFFFFFu) != 0u) & (ov ^ 1u);
        uint32_t out = (un & (0u - keep)) | (uc & (0u - ov));
        bits[i] = out;
        over[i] = ov;
        seen |= ov;
        nonzero += out != 0u;
    }
    *any = seen;
    return nonzero;
}

int64_t realign_exact_split(const void *in0, int32_t code0, const void *in1, int32_t code1,
                            int32_t code, void *p, void *neg, int64_t n) {
    if (code < RL_F32 || code > RL_F16 || code0 < RL_F32 || code0 > RL_F16 || code1 < RL_F32 ||
        code1 > RL_F16)
        return -1;
    float x0[RL_BLOCK], x1[RL_BLOCK], pv[RL_BLOCK];
    uint32_t bits[RL_BLOCK], over[RL_BLOCK];
    int64_t nonzero = 0, size = itemsize(code);
    for (int64_t b = 0; b < n; b += RL_BLOCK) {
        int64_t m = n - b < RL_BLOCK ? n - b : RL_BLOCK;
        uint32_t any = 0;
        decode(x0, at(in0, code0, b), code0, m, 0.0f);
        decode(x1, at(in1, code1, b), code1, m, 0.0f);
        decode(pv, at(p, code, b), code, m, 0.0f);
        nonzero += split_block(x0, x1, pv, m, bits, over, &any);
        for (int64_t i = 0; any && i < m; i++) /* the inputs, widened exactly to W (>= both) */
            if (over[i]) encode((char *)p + (b + i) * size, code, &(uint32_t){f2u(x0[i])}, 1);
        encode((char *)neg + b * size, code, bits, m);
    }
    return nonzero;
}

/* ---- exact residual packs in one pass: p, its rounding error, the statistics -------- */

/* W bits of fp32 bits b: RNE, exact where b is a W value (code is a constant here); as
 * bf16_encode / f16_encode, in 32-bit lanes only, which the vectoriser takes. */
RL_INLINE uint32_t to_w(uint32_t b, int code) {
    if (code == RL_F32) return b;
    uint32_t a = b & 0x7FFFFFFFu;
    if (code == RL_BF16) {
        uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
        uint32_t nan = 0u - (uint32_t)(a > 0x7F800000u); /* a mask: GCC 12 vectorises it */
        return (r & ~nan) | (0x7FC0u & nan);
    }
    uint32_t sign = (b >> 16) & 0x8000u;
    uint32_t big = a > 0x7F800000u ? (0x7E00u | ((a >> 13) & 0x3FFu)) : 0x7C00u;
    uint32_t sub = f2u(u2f(a) + 0.5f) - 0x3F000000u;
    uint32_t norm = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    uint32_t r = a >= 0x47800000u ? big : (a < 0x38800000u ? sub : norm);
    return r | sign;
}

RL_INLINE float from_w(uint32_t w, int code) {
    if (code == RL_F32) return u2f(w);
    if (code == RL_BF16) return u2f(w << 16);
    uint32_t mag = (w & 0x7FFFu) << 13;
    uint32_t exp = mag & 0x0F800000u;
    uint32_t norm = mag + 0x38000000u;
    uint32_t special = norm + 0x38000000u;
    float sub = u2f(mag + 0x38800000u) - u2f(0x38800000u);
    uint32_t r = exp == 0x0F800000u ? special : (exp == 0 ? f2u(sub) : norm);
    return u2f(r | ((w & 0x8000u) << 16));
}

/* p and neg of realign_exact_split (as W bits) straight from the inputs: s = RN32(x0 - x1)
 * and e = (x0 - x1) - s exactly (TwoSum). For W = F32, p = s; else s rounded to odd with
 * e's sign, RO24(X), rounds to nearest-even W as X itself does (24 >= W's precision + 2,
 * see the header), which is the residual kind's output. Then the split from p's value, as
 * in split_block; non-finite inputs give the plain formula's cast and neg = +0. s (the
 * plain fp32 formula) goes to sbuf for the statistics. */
RL_INLINE uint32_t resid_body(const float *restrict x0, const float *restrict x1, int64_t m,
                              int code, void *restrict p, void *restrict neg,
                              float *restrict sbuf) {
    const uint32_t inf_w = code == RL_BF16 ? 0x7F80u : code == RL_F16 ? 0x7C00u : 0x7F800000u;
    uint16_t *restrict p16 = (uint16_t *)p, *restrict n16 = (uint16_t *)neg;
    uint32_t *restrict p32 = (uint32_t *)p, *restrict n32 = (uint32_t *)neg;
    uint32_t nonzero = 0;
    for (int64_t i = 0; i < m; i++) {
        float a = x0[i], c = x1[i];
        float s = a - c, bb = s - a;
        float e = (a - (s - bb)) + (-c - bb);
        uint32_t us = f2u(s), ua = f2u(a), uc = f2u(c);
        /* round to odd, branch-free (odd32): one step away from zero or toward it */
        uint32_t above = e > 0.0f, below = e < 0.0f;
        uint32_t away = (us >> 31) ? below : above;
        uint32_t step = ((above | below) & ~us & 1u) * (away ? 1u : 0xFFFFFFFFu);
        uint32_t w = to_w(code == RL_F32 ? us : us + step, code);
        float ne = -((s - from_w(w, code)) + e);
        uint32_t un = f2u(ne);
        uint32_t fin = ((ua & 0x7F800000u) != 0x7F800000u) & ((uc & 0x7F800000u) != 0x7F800000u);
        uint32_t ov = fin & ((w & inf_w) == inf_w);
        uint32_t keep = fin & ((un & 0x7FFFFFFFu) != 0u) & (ov ^ 1u);
        /* Both values below are W values: BF16 takes their top half as it is. */
        uint32_t nv = (un & (0u - keep)) | (uc & (0u - ov)); /* exact in W: see the split */
        uint32_t pv = code == RL_BF16 ? ua >> 16 : to_w(ua, code);
        uint32_t wn = code == RL_BF16 ? nv >> 16 : to_w(nv, code);
        uint32_t wp = (w & (ov - 1u)) | (pv & (0u - ov));
        if (code == RL_F32) {
            p32[i] = wp;
            n32[i] = wn;
        } else {
            p16[i] = (uint16_t)wp;
            n16[i] = (uint16_t)wn;
        }
        nonzero += nv != 0u;
        sbuf[i] = s;
    }
    return nonzero;
}

RL_CLONES
static uint32_t resid_block(const float *x0, const float *x1, int64_t m, int code, void *p,
                            void *neg, float *sbuf) {
    if (code == RL_BF16) return resid_body(x0, x1, m, RL_BF16, p, neg, sbuf);
    if (code == RL_F16) return resid_body(x0, x1, m, RL_F16, p, neg, sbuf);
    return resid_body(x0, x1, m, RL_F32, p, neg, sbuf);
}

/* The residual kind's output p = RN_W(x0 - x1) and the split's neg (see
 * realign_exact_split) in one pass over the inputs, with the residual kind's statistics
 * (stats[0] += sum of squares, stats[1] = max |s|, summed as realign_combine sums them)
 * when want_stats. Returns how many neg elements are not +0, or -1 for an unknown code. */
int64_t realign_exact_residual(const void *in0, int32_t code0, const void *in1, int32_t code1,
                               int32_t code, void *p, void *neg, int64_t n, int32_t want_stats,
                               double *stats) {
    if (code < RL_F32 || code > RL_F16 || code0 < RL_F32 || code0 > RL_F16 || code1 < RL_F32 ||
        code1 > RL_F16)
        return -1;
    float x0[RL_BLOCK], x1[RL_BLOCK], sbuf[RL_BLOCK];
    rl_stats st;
    memset(&st, 0, sizeof st);
    int64_t nonzero = 0, size = itemsize(code);
    for (int64_t b = 0; b < n; b += RL_BLOCK) {
        int64_t m = n - b < RL_BLOCK ? n - b : RL_BLOCK;
        prefetch(in0, code0, b, n, 0);
        prefetch(in1, code1, b, n, 0);
        decode(x0, at(in0, code0, b), code0, m, 0.0f);
        decode(x1, at(in1, code1, b), code1, m, 0.0f);
        nonzero += resid_block(x0, x1, m, code, (char *)p + b * size, (char *)neg + b * size,
                               sbuf);
        if (want_stats) add_stats(&st, sbuf, m);
    }
    if (want_stats) fold_stats(&st, stats);
    return nonzero;
}

/* Byte-plane layout of exact-pack frames (app/residuals/frames.py): plane j holds byte j of
 * every element, planes back to back. */
RL_CLONES
static void planes(const uint8_t *restrict in, int64_t n, int32_t size, uint8_t *restrict out) {
    if (size == 2) {
        for (int64_t i = 0; i < n; i++) {
            out[i] = in[2 * i];
            out[n + i] = in[2 * i + 1];
        }
        return;
    }
    for (int64_t i = 0; i < n; i++)
        for (int32_t j = 0; j < size; j++) out[j * n + i] = in[i * size + j];
}

RL_CLONES
static void unplanes(const uint8_t *const *planes, int64_t n, int32_t size,
                     uint8_t *restrict out) {
    if (size == 2) {
        const uint8_t *restrict lo = planes[0], *restrict hi = planes[1];
        for (int64_t i = 0; i < n; i++) {
            out[2 * i] = lo[i];
            out[2 * i + 1] = hi[i];
        }
        return;
    }
    for (int64_t i = 0; i < n; i++)
        for (int32_t j = 0; j < size; j++) out[i * size + j] = planes[j][i];
}

/* Exported names stay plain (ctypes looks them up), the clones behind them: clang before
 * 17 exports a target_clones function only under a ".ifunc" suffix. */
void realign_planes(const uint8_t *restrict in, int64_t n, int32_t size, uint8_t *restrict out) {
    planes(in, n, size, out);
}

void realign_unplanes(const uint8_t *const *planes_in, int64_t n, int32_t size,
                      uint8_t *restrict out) {
    unplanes(planes_in, n, size, out);
}

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Bit k set where element k of the 32 bytes at e (16 of 2 bytes or 8 of 4) is not 0. */
static inline uint32_t nonzero_mask(const uint8_t *e, int32_t size) {
    uint32_t mask = 0;
#if defined(__SSE2__)
    const __m128i zero = _mm_setzero_si128();
    __m128i a = _mm_loadu_si128((const __m128i *)e), b = _mm_loadu_si128((const __m128i *)e + 1);
    if (size == 2) {
        __m128i z = _mm_packs_epi16(_mm_cmpeq_epi16(a, zero), _mm_cmpeq_epi16(b, zero));
        return ~(uint32_t)_mm_movemask_epi8(z) & 0xFFFFu;
    }
    mask = (uint32_t)_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(a, zero))) |
           (uint32_t)_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(b, zero))) << 4;
    return ~mask & 0xFFu;
#else
    for (int32_t k = 0; k < 32 / size; k++) {
        uint32_t v = 0;
        memcpy(&v, e + k * size, (size_t)size);
        mask |= (uint32_t)(v != 0) << k;
    }
    return mask;
#endif
}

/* Bit k set where element k of the 64 at e (of size 2 or 4 bytes) is not 0. */
RL_INLINE uint64_t nonzero_mask64(const uint8_t *e, int32_t size) {
    const int64_t per = 32 / size; /* elements per 32 bytes */
    uint64_t mask = 0;
    for (int64_t k = 0; k < 64 / per; k++) mask |= (uint64_t)nonzero_mask(e + 32 * k, size) << (k * per);
    return mask;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RL_AVX512BW __attribute__((target("avx512f,avx512bw")))
RL_AVX512BW RL_INLINE uint64_t nonzero_mask64_avx512(const uint8_t *e, int32_t size) {
    if (size == 2) {
        __m512i a = _mm512_loadu_si512((const void *)e), b = _mm512_loadu_si512((const void *)(e + 64));
        return (uint64_t)_mm512_test_epi16_mask(a, a) | (uint64_t)_mm512_test_epi16_mask(b, b) << 32;
    }
    uint64_t mask = 0;
    for (int k = 0; k < 4; k++) {
        __m512i a = _mm512_loadu_si512((const void *)(e + 64 * k));
        mask |= (uint64_t)_mm512_test_epi32_mask(a, a) << (16 * k);
    }
    return mask;
}
#endif

/* realign_sparse with `masks` telling the non-zero elements among 64. */
RL_INLINE int64_t sparse_body(const uint8_t *restrict neg, int64_t n, int32_t size,
                              uint32_t *restrict gaps, uint8_t *restrict values,
                              uint64_t (*masks)(const uint8_t *, int32_t)) {
    int64_t m = 0, last = 0, i = 0;
    if (size == 2 || size == 4) {
        for (; i + 64 <= n; i += 64) {
            for (uint64_t mask = masks(neg + i * size, size); mask; mask &= mask - 1) {
                int64_t at = i + __builtin_ctzll(mask);
                gaps[m] = (uint32_t)(at - last);
                memcpy(values + m * size, neg + at * size, (size_t)size);
                last = at;
                m++;
            }
        }
    }
    for (; i < n; i++) {
        const uint8_t *e = neg + i * size;
        uint32_t any = 0;
        for (int32_t j = 0; j < size; j++) any |= e[j];
        if (!any) continue;
        gaps[m] = (uint32_t)(i - last);
        memcpy(values + m * size, e, (size_t)size);
        last = i;
        m++;
    }
    return m;
}

#if defined(__x86_64__) && defined(__GNUC__)
RL_AVX512BW static int64_t sparse_avx512(const uint8_t *restrict neg, int64_t n, int32_t size,
                                         uint32_t *restrict gaps, uint8_t *restrict values) {
    return sparse_body(neg, n, size, gaps, values, nonzero_mask64_avx512);
}
#endif

/* The non-zero elements of neg (n elements of size bytes): the gap from the previous one
 * (the first: its index) into gaps, their bytes into values; returns how many. Corrections
 * fall at random, so rather than branch on each element (or on short runs of zeros), a
 * mask of the non-zero ones among 64 is walked bit by bit. */
int64_t realign_sparse(const uint8_t *restrict neg, int64_t n, int32_t size,
                       uint32_t *restrict gaps, uint8_t *restrict values) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx512bw")) return sparse_avx512(neg, n, size, gaps, values);
#endif
    return sparse_body(neg, n, size, gaps, values, nonzero_mask64);
}

/* The inverse: zero neg, then put values at the positions gaps give. Returns 0, or -1
 * where a position falls outside [0, n). */
int32_t realign_scatter(const uint32_t *restrict gaps, const uint8_t *restrict values,
                        int64_t m, int64_t n, int32_t size, uint8_t *restrict neg) {
    memset(neg, 0, (size_t)(n * size));
    int64_t at = 0;
    for (int64_t k = 0; k < m; k++) {
        at += gaps[k];
        if (at >= n) return -1;
        memcpy(neg + at * size, values + k * size, (size_t)size);
    }
    return 0;
}

/* realign_scatter for corrections stored by byte plane (realign.frames/3): byte k of
 * gap i at gaps[k * m + i] (4 planes), byte j of value i at values[j * m + i]. Returns 0,
 * or -1 where a position falls outside [0, n). */
int32_t realign_scatter_planes(const uint8_t *restrict gaps, const uint8_t *restrict values,
                               int64_t m, int64_t n, int32_t size, uint8_t *restrict neg) {
    memset(neg, 0, (size_t)(n * size));
    int64_t at = 0;
    for (int64_t k = 0; k < m; k++) {
        at += (int64_t)gaps[k] | (int64_t)gaps[m + k] << 8 | (int64_t)gaps[2 * m + k] << 16 |
              (int64_t)gaps[3 * m + k] << 24;
        if (at >= n) return -1;
        for (int32_t j = 0; j < size; j++) neg[at * size + j] = values[j * m + k];
    }
    return 0;
}

/* ---- nibble code of a byte plane (an exact pack's sign/exponent plane) ----------------
 * A residual's sign/exponent byte takes few values, so each byte becomes its 4-bit code:
 * its index in an alphabet of at most 15 values, or 15 (an escape: the byte itself goes
 * to a list of escapes, in order). Two codes per coded byte, the first in the low nibble;
 * an odd count pads with a 0 nibble. Half the size of the plane at a fraction of the cost
 * of an entropy coder (which would reach ~0.3 of it). */

/* The alphabet for realign_nib_encode: the (at most 15) most frequent of the n bytes of
 * src, most frequent first (ties: the smaller byte), into alpha. Returns how many, and in
 * *escaped how many of the n bytes it leaves out. */
int32_t realign_nib_alphabet(const uint8_t *restrict src, int64_t n, uint8_t *restrict alpha,
                             int64_t *escaped) {
    int64_t hist[4][256], count[256], kept = 0;
    int32_t k = 0;
    uint8_t taken[256] = {0};
    memset(hist, 0, sizeof hist);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) { /* four tables: repeats of one byte do not wait on each other */
        hist[0][src[i]]++;
        hist[1][src[i + 1]]++;
        hist[2][src[i + 2]]++;
        hist[3][src[i + 3]]++;
    }
    for (; i < n; i++) hist[0][src[i]]++;
    for (int b = 0; b < 256; b++) count[b] = hist[0][b] + hist[1][b] + hist[2][b] + hist[3][b];
    for (; k < 15; k++) {
        int best = -1;
        for (int b = 0; b < 256; b++)
            if (!taken[b] && count[b] > 0 && (best < 0 || count[b] > count[best])) best = b;
        if (best < 0) break;
        taken[best] = 1;
        alpha[k] = (uint8_t)best;
        kept += count[best];
    }
    *escaped = n - kept;
    return k;
}

#define RL_NIB 256 /* bytes per block: compare loops the compiler vectorises, in L1 */

#if defined(__GNUC__)
typedef uint8_t rl_u8x32 __attribute__((vector_size(32)));
#endif

/* The alphabet as the codes need it: each value, and its code flipped (c ^ 15), in every
 * byte of a vector. */
typedef struct {
    const uint8_t *alpha;
    int32_t k;
#if defined(__GNUC__)
    rl_u8x32 keys[15], flips[15];
#endif
} rl_alphabet;

static void nib_alphabet_init(rl_alphabet *a, const uint8_t *alpha, int32_t k) {
    a->alpha = alpha;
    a->k = k;
#if defined(__GNUC__)
    for (int32_t c = 0; c < k; c++) {
        uint8_t kb[32], fb[32];
        memset(kb, alpha[c], sizeof kb);
        memset(fb, c ^ 15, sizeof fb);
        memcpy(&a->keys[c], kb, sizeof kb);
        memcpy(&a->flips[c], fb, sizeof fb);
    }
#endif
}

/* Codes of one block: the index of each byte in the alphabet (values all different), else
 * 15. Each byte collects (c ^ 15) of the one value it equals, 0 where none, and flips back. */
RL_INLINE void nib_codes(const uint8_t *restrict src, int64_t m, const rl_alphabet *a,
                         uint8_t *restrict code) {
    int64_t i = 0;
    const int32_t k = a->k;
#if defined(__GNUC__)
    /* 128 bytes in registers against every value: no loads or stores between compares. */
    for (; i + 128 <= m; i += 128) {
        rl_u8x32 s0, s1, s2, s3, c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
        memcpy(&s0, src + i, 32);
        memcpy(&s1, src + i + 32, 32);
        memcpy(&s2, src + i + 64, 32);
        memcpy(&s3, src + i + 96, 32);
        for (int32_t c = 0; c < k; c++) {
            const rl_u8x32 key = a->keys[c], flip = a->flips[c];
            c0 |= (rl_u8x32)(s0 == key) & flip;
            c1 |= (rl_u8x32)(s1 == key) & flip;
            c2 |= (rl_u8x32)(s2 == key) & flip;
            c3 |= (rl_u8x32)(s3 == key) & flip;
        }
        c0 ^= 15;
        c1 ^= 15;
        c2 ^= 15;
        c3 ^= 15;
        memcpy(code + i, &c0, 32);
        memcpy(code + i + 32, &c1, 32);
        memcpy(code + i + 64, &c2, 32);
        memcpy(code + i + 96, &c3, 32);
    }
#endif
    for (; i < m; i++) {
        uint8_t c = 15;
        for (int32_t j = 0; j < k; j++) c = src[i] == a->alpha[j] ? (uint8_t)j : c;
        code[i] = c;
    }
}

RL_CLONES
static int64_t nib_encode(const uint8_t *restrict src, int64_t n, const uint8_t *restrict alpha,
                          int32_t k, uint8_t *restrict nib, uint8_t *restrict esc, int64_t cap) {
    uint8_t code[RL_NIB];
    int64_t escaped = 0;
    rl_alphabet a;
    nib_alphabet_init(&a, alpha, k);
    for (int64_t b = 0; b < n; b += RL_NIB) {
        int64_t m = n - b < RL_NIB ? n - b : RL_NIB;
        nib_codes(src + b, m, &a, code);
        uint8_t any = 0;
        for (int64_t i = 0; i < m; i++) any |= (uint8_t)(code[i] + 1) & 16; /* code 15 */
        if (m & 1) code[m] = 0;
        for (int64_t i = 0; i < (m + 1) / 2; i++)
            nib[b / 2 + i] = (uint8_t)(code[2 * i] | code[2 * i + 1] << 4);
        for (int64_t i = 0; any && i < m; i++) {
            if (code[i] != 15) continue;
            if (escaped == cap) return -1;
            esc[escaped++] = src[b + i];
        }
    }
    return escaped;
}

/* One element's byte from its code (the escapes in order), as realign_nib_decode. */
RL_INLINE int32_t nib_one(uint32_t c, const uint8_t *restrict alpha, int32_t k,
                          const uint8_t *restrict esc, int64_t n_esc, int64_t *used,
                          uint8_t *out) {
    if (c < (uint32_t)k) {
        *out = alpha[c];
        return 0;
    }
    if (c != 15u || *used == n_esc) return -1;
    *out = esc[(*used)++];
    return 0;
}

RL_CLONES
static int32_t nib_decode(const uint8_t *restrict nib, int64_t n, const uint8_t *restrict alpha,
                           int32_t k, const uint8_t *restrict esc, int64_t n_esc,
                           uint8_t *restrict dst) {
    int64_t used = 0, j = 0;
    if (k < 0 || k > 15) return -1;
    if ((n & 1) && nib[n / 2] >> 4) return -1;
#if defined(__GNUC__) && !defined(__clang__)
    /* 32 elements at a time: a byte shuffle (pshufb) looks codes up in the alphabet. */
    typedef uint8_t u8x16 __attribute__((vector_size(16)));
    const u8x16 even = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
    const u8x16 odd = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    u8x16 table = {0}, top;
    memcpy(&table, alpha, (size_t)k);
    memset(&top, k, sizeof top);
    for (; j + 16 <= n / 2; j += 16) {
        u8x16 x, c0, c1;
        memcpy(&x, nib + j, 16);
        c0 = __builtin_shuffle(x & 15, x >> 4, even);
        c1 = __builtin_shuffle(x & 15, x >> 4, odd);
        u8x16 o0 = __builtin_shuffle(table, c0), o1 = __builtin_shuffle(table, c1);
        u8x16 over = (u8x16)((c0 >= top) | (c1 >= top));
        memcpy(dst + 2 * j, &o0, 16);
        memcpy(dst + 2 * j + 16, &o1, 16);
        uint64_t flags[2];
        memcpy(flags, &over, 16);
        if (!(flags[0] | flags[1])) continue;
        for (int64_t i = 2 * j; i < 2 * j + 32; i++) /* escapes (rare) or damage */
            if (nib_one(i & 1 ? (uint32_t)nib[i / 2] >> 4 : nib[i / 2] & 15u, alpha, k, esc,
                        n_esc, &used, dst + i))
                return -1;
    }
#endif
    for (int64_t i = 2 * j; i < n; i++)
        if (nib_one(i & 1 ? (uint32_t)nib[i / 2] >> 4 : nib[i / 2] & 15u, alpha, k, esc, n_esc,
                    &used, dst + i))
            return -1;
    return used == n_esc ? 0 : -1;
}

/* Code n bytes of src, the k values of alpha (k <= 15, all different) taking codes
 * 0..k-1, into (n + 1) / 2 bytes of nib and the escaped bytes into esc. Returns how many
 * bytes were escaped, or -1 past cap (esc holds cap bytes; or k > 15, or a value twice):
 * the plane is not worth this code. */
int64_t realign_nib_encode(const uint8_t *restrict src, int64_t n, const uint8_t *restrict alpha,
                           int32_t k, uint8_t *restrict nib, uint8_t *restrict esc, int64_t cap) {
    if (k < 0 || k > 15) return -1;
    for (int32_t a = 0; a < k; a++)
        for (int32_t b = a + 1; b < k; b++)
            if (alpha[a] == alpha[b]) return -1;
    return nib_encode(src, n, alpha, k, nib, esc, cap);
}

/* The inverse into n bytes of dst, with the alphabet's k values (k <= 15). Returns 0, or
 * -1 for a damaged section: a code past the alphabet, escapes that run out or are left
 * over, a pad nibble that is not 0. */
int32_t realign_nib_decode(const uint8_t *restrict nib, int64_t n, const uint8_t *restrict alpha,
                           int32_t k, const uint8_t *restrict esc, int64_t n_esc,
                           uint8_t *restrict dst) {
    return nib_decode(nib, n, alpha, k, esc, n_esc, dst);
}

/* ---- the Python module: buffer addresses for the ctypes wrapper -------------------- */

static PyObject *buffer_address(PyObject *obj, int flags) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, flags) < 0) return NULL;
    void *p = view.buf;
    PyBuffer_Release(&view); /* the caller's memoryview keeps the memory exported */
    return PyLong_FromVoidPtr(p);
}

static PyObject *address(PyObject *self, PyObject *obj) {
    (void)self;
    return buffer_address(obj, PyBUF_SIMPLE);
}

static PyObject *writable_address(PyObject *self, PyObject *obj) {
    (void)self;
    return buffer_address(obj, PyBUF_WRITABLE);
}

static PyMethodDef methods[] = {
    {"address", address, METH_O, "Address of a C-contiguous buffer (read-only is fine)."},
    {"writable_address", writable_address, METH_O, "Address of a writable C-contiguous buffer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "Realign's element-wise merge kernel (see native.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
