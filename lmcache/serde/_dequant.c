/* Dequantization loops of the fp8, int8 and int4 codecs (lmcache.serde.quant), in C.
 *
 * Each loop turns codes into float32 (a short row at a time, in an L1-sized stack buffer), scales
 * them (times a scale, plus a centre: separate float32 multiply and add, never fused, exactly as
 * the torch path's mul_/add_ round) and writes the result straight into the destination chunk in
 * its dtype (float32, float16 or bfloat16, round to nearest even, as torch's copy_ rounds). So
 * both paths give identical bytes; tests check it.
 *
 * The destination is addressed as [layers, parts, tokens] rows of heads * dim contiguous elements,
 * with byte strides for the three outer axes (the fp8 codec skips the chunk's first token, which
 * it stores exact). An AVX-512 (F + BW) or AVX2 + F16C loop runs where the CPU has them (checked
 * at run time, so the library builds with plain flags), else a scalar loop of the same arithmetic.
 *
 * Built on first use by lmcache/serde/dequant_native.py (lmcache.native_build); links nothing.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LMC_X86 1
#define TGT __attribute__((target("avx2,f16c")))
#else
#define LMC_X86 0
#endif

#if defined(__FLT16_MAX__)
#define LMC_HAVE_F16 1
#else
#define LMC_HAVE_F16 0
#endif

/* OUT_BF16T: bfloat16 with NaN written 0xFFFF, as torch's vectorised float32 -> bfloat16 copy_
 * writes it (OUT_BF16 writes 0x7FC0, as c10::BFloat16 does): the fp8 version 2 path that rotated
 * keys in a float32 scratch ended in that copy_, and the fused loop keeps its bytes. */
enum { OUT_F32 = 0, OUT_F16 = 1, OUT_BF16 = 2, OUT_BF16T = 3 };
#define IS_BF16(k) ((k) == OUT_BF16 || (k) == OUT_BF16T)
#define BF16_NAN(k) ((k) == OUT_BF16T ? 0xFFFF : 0x7FC0)
enum { CODE_FP8 = 0, CODE_INT8 = 1 };

#define SEG 512 /* floats per stack buffer: rows are cut into segments of at most this */

static float fp8_table[256];

static float half_bits_to_float(uint16_t h) {
    uint32_t e = (h >> 10) & 31, m = h & 1023;
    float v;
    if (e == 0)
        v = ldexpf((float)m, -24);
    else if (e == 31)
        v = m ? NAN : INFINITY;
    else
        v = ldexpf((float)(m + 1024), (int)e - 25);
    return (h & 0x8000) ? -v : v;
}

/* The value of each e4m3 code divided by 256, as the torch path computes it: the code's bits
 * sign-extended to 16 bits, shifted left by 7 and masked with 0xBF80 form a float16. */
void lmc_dq_init(void) {
    for (int c = 0; c < 256; c++) {
        uint16_t x = (uint16_t)(int16_t)(int8_t)(uint8_t)c;
        fp8_table[c] = half_bits_to_float((uint16_t)((uint16_t)(x << 7) & 0xBF80));
    }
}

/* The widest loop this CPU runs: 3 (AVX-512 F+BW+DQ and BF16), 2 (AVX-512 F+BW+DQ), 1 (AVX2 +
 * F16C) or 0 (scalar). */
int lmc_dq_has_simd(void) {
#if LMC_X86
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c"))
        return 0;
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512dq"))
        return 1;
#if (defined(__clang__) && __clang_major__ >= 11) || (!defined(__clang__) && __GNUC__ >= 10)
    if (__builtin_cpu_supports("avx512bf16"))
        return 3;
#endif
    return 2;
#else
    return 0;
#endif
}

/* ---- scalar helpers -------------------------------------------------------------------- */

static inline uint16_t f32_to_bf16(float f, uint16_t nan) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f)
        return nan;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static void store_scalar(int out_kind, uint8_t *out, const float *y, int64_t n) {
    if (out_kind == OUT_F32) {
        memcpy(out, y, (size_t)n * 4);
    } else if (IS_BF16(out_kind)) {
        uint16_t *o = (uint16_t *)out;
        for (int64_t i = 0; i < n; i++)
            o[i] = f32_to_bf16(y[i], BF16_NAN(out_kind));
    } else {
#if LMC_HAVE_F16
        _Float16 *o = (_Float16 *)out;
        for (int64_t i = 0; i < n; i++)
            o[i] = (_Float16)y[i];
#endif
    }
}

static void codes_scalar(int kind, const uint8_t *codes, int64_t n, float *x) {
    if (kind == CODE_FP8)
        for (int64_t i = 0; i < n; i++)
            x[i] = fp8_table[codes[i]];
    else
        for (int64_t i = 0; i < n; i++)
            x[i] = (float)(int8_t)codes[i];
}

/* y = x * s (+ c), s and c per element (vector) or one each (scalar, c_one used when has_c). */
static void affine_scalar(const float *x, int64_t n, const float *s, const float *c, float s_one, float c_one,
                          int has_c, int out_kind, uint8_t *out) {
    float y[SEG];
    for (int64_t i = 0; i < n; i++) {
        float v = x[i] * (s ? s[i] : s_one);
        if (has_c)
            v = v + (c ? c[i] : c_one); /* built with -ffp-contract=off: never fused with the multiply */
        y[i] = v;
    }
    store_scalar(out_kind, out, y, n);
}

/* ---- AVX2 + F16C helpers -------------------------------------------------------------- */
#if LMC_X86
TGT static inline __attribute__((always_inline)) void store8_avx2(int out_kind, uint8_t *out, __m256 y) {
    if (IS_BF16(out_kind)) {
        __m256i u = _mm256_castps_si256(y);
        __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(u, 16),
                                                                                    _mm256_set1_epi32(1)));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
        __m256 ord = _mm256_cmp_ps(y, y, _CMP_ORD_Q);
        r = _mm256_blendv_epi8(_mm256_set1_epi32(BF16_NAN(out_kind)), r, _mm256_castps_si256(ord));
        __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128((__m128i *)out, packed);
    } else if (out_kind == OUT_F16) {
        _mm_storeu_si128((__m128i *)out, _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        _mm256_storeu_ps((float *)out, y);
    }
}

#endif

/* ---- fused rows ------------------------------------------------------------------------
 * One pass per row: load 8 codes, to float32, times the scale(s), plus the centre(s), round and
 * store. row_fused is inlined into a call per combination of its switches (constants there), so
 * the loop has no branches. Code kinds here: CODE_FP8, CODE_INT8, and the int4 nibble planes. */
enum { NIB_LO = 2, NIB_HI = 3 };

static void codes_any_scalar(int kind, const uint8_t *codes, int64_t n, float *x) {
    if (kind == NIB_LO)
        for (int64_t i = 0; i < n; i++)
            x[i] = (float)(codes[i] & 15);
    else if (kind == NIB_HI)
        for (int64_t i = 0; i < n; i++)
            x[i] = (float)(codes[i] >> 4);
    else
        codes_scalar(kind, codes, n, x);
}

#if LMC_X86
TGT static inline __attribute__((always_inline)) __m256 load8(int kind, const uint8_t *p) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    if (kind == CODE_FP8)
        return _mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), _mm_set1_epi16((short)0xBF80)));
    if (kind == CODE_INT8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    __m256i q = _mm256_cvtepu8_epi32(b);
    q = kind == NIB_LO ? _mm256_and_si256(q, _mm256_set1_epi32(15)) : _mm256_srli_epi32(q, 4);
    return _mm256_cvtepi32_ps(q);
}

TGT static inline __attribute__((always_inline)) void row_fused(int kind, const uint8_t *codes, int64_t n,
                                                                const float *s, const float *c, float s1, float c1,
                                                                int vec, int has_c, int out_kind, uint8_t *out) {
    const int64_t isz = out_kind == OUT_F32 ? 4 : 2;
    const __m256 vs1 = _mm256_set1_ps(s1), vc1 = _mm256_set1_ps(c1);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 y = _mm256_mul_ps(load8(kind, codes + i), vec ? _mm256_loadu_ps(s + i) : vs1);
        if (has_c)
            y = _mm256_add_ps(y, vec ? _mm256_loadu_ps(c + i) : vc1);
        store8_avx2(out_kind, out + i * isz, y);
    }
    if (i < n) {
        float x[8];
        codes_any_scalar(kind, codes + i, n - i, x);
        affine_scalar(x, n - i, vec ? s + i : 0, vec && has_c ? c + i : 0, s1, c1, has_c, out_kind, out + i * isz);
    }
}

#define LMC_OUTS(K, V, C)                                                                                            \
    switch (out_kind) {                                                                                              \
    case OUT_BF16:                                                                                                   \
        row_fused(K, codes, n, s, c, s1, c1, V, C, OUT_BF16, out);                                                   \
        break;                                                                                                       \
    case OUT_BF16T:                                                                                                  \
        row_fused(K, codes, n, s, c, s1, c1, V, C, OUT_BF16T, out);                                                  \
        break;                                                                                                       \
    case OUT_F16:                                                                                                    \
        row_fused(K, codes, n, s, c, s1, c1, V, C, OUT_F16, out);                                                    \
        break;                                                                                                       \
    default:                                                                                                         \
        row_fused(K, codes, n, s, c, s1, c1, V, C, OUT_F32, out);                                                    \
    }

#define LMC_KINDS(V, C)                                                                                              \
    switch (kind) {                                                                                                  \
    case CODE_FP8:                                                                                                   \
        LMC_OUTS(CODE_FP8, V, C) break;                                                                              \
    case CODE_INT8:                                                                                                  \
        LMC_OUTS(CODE_INT8, V, C) break;                                                                             \
    case NIB_LO:                                                                                                     \
        LMC_OUTS(NIB_LO, V, C) break;                                                                                \
    default:                                                                                                         \
        LMC_OUTS(NIB_HI, V, C)                                                                                       \
    }

TGT static void row_avx2(int kind, const uint8_t *codes, int64_t n, const float *s, const float *c, float s1, float c1,
                         int has_c, int out_kind, uint8_t *out) {
    if (s) {
        if (c) {
            LMC_KINDS(1, 1)
        } else {
            LMC_KINDS(1, 0)
        }
    } else {
        if (has_c) {
            LMC_KINDS(0, 1)
        } else {
            LMC_KINDS(0, 0) /* no add of a zero centre: -0.0 + 0.0 would turn -0.0 into +0.0 */
        }
    }
}

/* ---- AVX-512 (F + BW + DQ): 16 elements a step, the rest through the AVX2 row ------------
 * Where the CPU has AVX512-BF16 too (simd level 3), float32 -> bfloat16 is one instruction,
 * vcvtneps2bf16: round to nearest even, as torch, except for NaN (we write 0x7FC0 or 0xFFFF,
 * the instruction keeps sign and payload) and float32 denormals (it reads them as zero), so a step
 * with any such lane (one fpclass test) rounds with integers instead. bf, a constant once
 * inlined, picks that; the build takes the bf16 target only from compilers that know it. */
#if (defined(__clang__) && __clang_major__ >= 11) || (!defined(__clang__) && __GNUC__ >= 10)
#define LMC_BF16 1
#define TGT512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,f16c")))
#else
#define LMC_BF16 0
#define TGT512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")))
#endif

TGT512 static inline __attribute__((always_inline)) __m512 load16(int kind, const uint8_t *p) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    if (kind == CODE_FP8)
        return _mm512_cvtph_ps(
            _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), _mm256_set1_epi16((short)0xBF80)));
    if (kind == CODE_INT8)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    __m512i q = _mm512_cvtepu8_epi32(b);
    q = kind == NIB_LO ? _mm512_and_si512(q, _mm512_set1_epi32(15)) : _mm512_srli_epi32(q, 4);
    return _mm512_cvtepi32_ps(q);
}

TGT512 static inline __attribute__((always_inline)) void store16(int out_kind, uint8_t *out, __m512 y, int bf) {
    if (IS_BF16(out_kind)) {
#if LMC_BF16
        if (bf && !_mm512_fpclass_ps_mask(y, 0x01 | 0x20 | 0x80)) { /* no QNaN, denormal or SNaN lane */
            _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(y));
            return;
        }
#else
        (void)bf;
#endif
        __m512i u = _mm512_castps_si512(y);
        __m512i bias =
            _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
        r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), r, _mm512_set1_epi32(BF16_NAN(out_kind)));
        _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(r));
    } else if (out_kind == OUT_F16) {
        _mm256_storeu_si256((__m256i *)out, _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        _mm512_storeu_ps((float *)out, y);
    }
}

TGT512 static inline __attribute__((always_inline)) void row512_fused(int kind, const uint8_t *codes, int64_t n,
                                                                      const float *s, const float *c, float s1,
                                                                      float c1, int vec, int has_c, int out_kind,
                                                                      uint8_t *out, int bf) {
    const int64_t isz = out_kind == OUT_F32 ? 4 : 2;
    const __m512 vs1 = _mm512_set1_ps(s1), vc1 = _mm512_set1_ps(c1);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 y = _mm512_mul_ps(load16(kind, codes + i), vec ? _mm512_loadu_ps(s + i) : vs1);
        if (has_c)
            y = _mm512_add_ps(y, vec ? _mm512_loadu_ps(c + i) : vc1);
        store16(out_kind, out + i * isz, y, bf);
    }
    if (i < n)
        row_avx2(kind, codes + i, n - i, vec ? s + i : 0, vec && has_c ? c + i : 0, s1, c1, has_c, out_kind,
                 out + i * isz);
}

#define LMC_ROW_SWITCHES                                                                                             \
    if (s) {                                                                                                         \
        if (c) {                                                                                                     \
            LMC_KINDS(1, 1)                                                                                          \
        } else {                                                                                                     \
            LMC_KINDS(1, 0)                                                                                          \
        }                                                                                                            \
    } else {                                                                                                         \
        if (has_c) {                                                                                                 \
            LMC_KINDS(0, 1)                                                                                          \
        } else {                                                                                                     \
            LMC_KINDS(0, 0)                                                                                          \
        }                                                                                                            \
    }

TGT512 static void row_avx512(int kind, const uint8_t *codes, int64_t n, const float *s, const float *c, float s1,
                              float c1, int has_c, int out_kind, uint8_t *out, int bf) {
    if (bf) {
#define row_fused(...) row512_fused(__VA_ARGS__, 1)
        LMC_ROW_SWITCHES
#undef row_fused
    } else {
#define row_fused(...) row512_fused(__VA_ARGS__, 0)
        LMC_ROW_SWITCHES
#undef row_fused
    }
}
#endif

/* Row of n codes (kind) into out: x * s (+ c) per element when s is given (c may be NULL), else
 * x * s1 (+ c1 when has_c). */
static void row(int simd, int kind, const uint8_t *codes, int64_t n, const float *s, const float *c, float s1,
                float c1, int has_c, int out_kind, uint8_t *out) {
    if (s)
        has_c = c != 0;
#if LMC_X86
    if (simd >= 2) {
        row_avx512(kind, codes, n, s, c, s1, c1, has_c, out_kind, out, simd >= 3);
        return;
    }
    if (simd == 1) {
        row_avx2(kind, codes, n, s, c, s1, c1, has_c, out_kind, out);
        return;
    }
#endif
    const int64_t isz = out_kind == OUT_F32 ? 4 : 2;
    float x[SEG];
    for (int64_t e = 0; e < n; e += SEG) {
        int64_t k = n - e < SEG ? n - e : SEG;
        codes_any_scalar(kind, codes + e, k, x);
        affine_scalar(x, k, s ? s + e : 0, c ? c + e : 0, s1, c1, has_c, out_kind, out + e * isz);
    }
}

/* ---- keys with RoPE, fused ---------------------------------------------------------------
 * One head of one key row: the D codes to float32, times the scale, plus the centre (as row()),
 * then rotate-half RoPE on the pairs a = x[:h], b = x[h:] (h = D / 2): a' = a*cos - b*sin,
 * b' = b*cos + a*sin, each product rounded to float32 and never fused (-ffp-contract=off), then
 * round into the output dtype. All in registers: the same float32 values lmc_dq_rope computes
 * from the same float32 keys (and torch's _rotate_keys), so the same bytes. */

static inline float code_value(int kind, uint8_t c) {
    return kind == CODE_FP8 ? fp8_table[c] : (float)(int8_t)c;
}

static void store1(int out_kind, uint8_t *out, int64_t i, float y) {
    store_scalar(out_kind, out + i * (out_kind == OUT_F32 ? 4 : 2), &y, 1);
}

/* Pairs d0 .. h - 1 of one head, one element at a time (the SIMD loops' tails, and simd 0). */
static void rope_head_scalar(int kind, const uint8_t *codes, int64_t h, int64_t d0, const float *s, const float *c,
                             const float *cs, const float *sn, int out_kind, uint8_t *out) {
    for (int64_t d = d0; d < h; d++) {
        float a = code_value(kind, codes[d]) * s[d], b = code_value(kind, codes[h + d]) * s[h + d];
        if (c) {
            a = a + c[d];
            b = b + c[h + d];
        }
        const float ac = a * cs[d], bs = b * sn[d], bc = b * cs[d], as = a * sn[d];
        store1(out_kind, out, d, ac - bs);
        store1(out_kind, out, h + d, bc + as);
    }
}

#if LMC_X86
/* Heads' pairs from d on, 8 at a time in AVX2, then the scalar tail (also the AVX-512 loop's tail). */
TGT static inline __attribute__((always_inline)) void rope8_from(int kind, const uint8_t *codes, int64_t h, int64_t d,
                                                                 const float *s, const float *c, const float *cs,
                                                                 const float *sn, int has_c, int out_kind,
                                                                 uint8_t *out) {
    const int64_t isz = out_kind == OUT_F32 ? 4 : 2;
    for (; d + 8 <= h; d += 8) {
        __m256 a = _mm256_mul_ps(load8(kind, codes + d), _mm256_loadu_ps(s + d));
        __m256 b = _mm256_mul_ps(load8(kind, codes + h + d), _mm256_loadu_ps(s + h + d));
        if (has_c) {
            a = _mm256_add_ps(a, _mm256_loadu_ps(c + d));
            b = _mm256_add_ps(b, _mm256_loadu_ps(c + h + d));
        }
        const __m256 vc = _mm256_loadu_ps(cs + d), vs = _mm256_loadu_ps(sn + d);
        store8_avx2(out_kind, out + d * isz, _mm256_sub_ps(_mm256_mul_ps(a, vc), _mm256_mul_ps(b, vs)));
        store8_avx2(out_kind, out + (h + d) * isz, _mm256_add_ps(_mm256_mul_ps(b, vc), _mm256_mul_ps(a, vs)));
    }
    if (d < h)
        rope_head_scalar(kind, codes, h, d, s, has_c ? c : 0, cs, sn, out_kind, out);
}

TGT static inline __attribute__((always_inline)) void rope_fused(int kind, const uint8_t *codes, int64_t h,
                                                                 const float *s, const float *c, const float *cs,
                                                                 const float *sn, int has_c, int out_kind,
                                                                 uint8_t *out) {
    rope8_from(kind, codes, h, 0, s, c, cs, sn, has_c, out_kind, out);
}

TGT512 static inline __attribute__((always_inline)) void rope512_fused(int kind, const uint8_t *codes, int64_t h,
                                                                       const float *s, const float *c,
                                                                       const float *cs, const float *sn, int has_c,
                                                                       int out_kind, uint8_t *out, int bf) {
    const int64_t isz = out_kind == OUT_F32 ? 4 : 2;
    int64_t d = 0;
    for (; d + 16 <= h; d += 16) {
        __m512 a = _mm512_mul_ps(load16(kind, codes + d), _mm512_loadu_ps(s + d));
        __m512 b = _mm512_mul_ps(load16(kind, codes + h + d), _mm512_loadu_ps(s + h + d));
        if (has_c) {
            a = _mm512_add_ps(a, _mm512_loadu_ps(c + d));
            b = _mm512_add_ps(b, _mm512_loadu_ps(c + h + d));
        }
        const __m512 vc = _mm512_loadu_ps(cs + d), vs = _mm512_loadu_ps(sn + d);
        store16(out_kind, out + d * isz, _mm512_sub_ps(_mm512_mul_ps(a, vc), _mm512_mul_ps(b, vs)), bf);
        store16(out_kind, out + (h + d) * isz, _mm512_add_ps(_mm512_mul_ps(b, vc), _mm512_mul_ps(a, vs)), bf);
    }
    rope8_from(kind, codes, h, d, s, c, cs, sn, has_c, out_kind, out); /* an AVX2 step, then the scalar tail */
}

/* The keys of one layer: Tc rows of H heads (codes [Tc, H, 2h], rows of the output sT bytes
 * apart), scale s and centre c (or NULL) [H, 2h], cos and sin [Tc, h]. F (a fused head, inlined)
 * runs inside the loops, so the switches below pick one branch-free loop per call. */
#define LMC_ROPE_LOOP(F, K, C, O)                                                                                    \
    for (int64_t t = 0; t < Tc; t++)                                                                                 \
        for (int64_t j = 0; j < H; j++)                                                                              \
            F(K, codes + (t * H + j) * 2 * h, h, s + j * 2 * h, C ? c + j * 2 * h : 0, cos_t + t * h, sin_t + t * h,    \
              C, O, out + t * sT + j * 2 * h * (O == OUT_F32 ? 4 : 2));
#define LMC_ROPE_OUTS(F, K, C)                                                                                       \
    switch (out_kind) {                                                                                              \
    case OUT_BF16:                                                                                                   \
        LMC_ROPE_LOOP(F, K, C, OUT_BF16) break;                                                                      \
    case OUT_BF16T:                                                                                                  \
        LMC_ROPE_LOOP(F, K, C, OUT_BF16T) break;                                                                     \
    case OUT_F16:                                                                                                    \
        LMC_ROPE_LOOP(F, K, C, OUT_F16) break;                                                                       \
    default:                                                                                                         \
        LMC_ROPE_LOOP(F, K, C, OUT_F32)                                                                              \
    }
#define LMC_ROPE_ALL(F)                                                                                              \
    if (kind == CODE_FP8) {                                                                                          \
        if (c) {                                                                                                     \
            LMC_ROPE_OUTS(F, CODE_FP8, 1)                                                                            \
        } else {                                                                                                     \
            LMC_ROPE_OUTS(F, CODE_FP8, 0)                                                                            \
        }                                                                                                            \
    } else {                                                                                                         \
        if (c) {                                                                                                     \
            LMC_ROPE_OUTS(F, CODE_INT8, 1)                                                                           \
        } else {                                                                                                     \
            LMC_ROPE_OUTS(F, CODE_INT8, 0)                                                                           \
        }                                                                                                            \
    }

TGT static void rope_keys_avx2(int kind, const uint8_t *codes, int64_t Tc, int64_t H, int64_t h, const float *s,
                               const float *c, const float *cos_t, const float *sin_t, int out_kind, uint8_t *out,
                               int64_t sT) {
    LMC_ROPE_ALL(rope_fused)
}

#define rope512_bf0(...) rope512_fused(__VA_ARGS__, 0)
#define rope512_bf1(...) rope512_fused(__VA_ARGS__, 1)

TGT512 static void rope_keys_avx512(int kind, const uint8_t *codes, int64_t Tc, int64_t H, int64_t h, const float *s,
                                    const float *c, const float *cos_t, const float *sin_t, int out_kind,
                                    uint8_t *out, int64_t sT, int bf) {
    if (bf) {
        LMC_ROPE_ALL(rope512_bf1)
    } else {
        LMC_ROPE_ALL(rope512_bf0)
    }
}
#endif

/* The keys of one layer with RoPE (arguments as rope_keys_avx2's). */
static void rope_keys(int simd, int kind, const uint8_t *codes, int64_t Tc, int64_t H, int64_t h, const float *s,
                      const float *c, const float *cos_t, const float *sin_t, int out_kind, uint8_t *out,
                      int64_t sT) {
#if LMC_X86
    if (simd >= 2) {
        rope_keys_avx512(kind, codes, Tc, H, h, s, c, cos_t, sin_t, out_kind, out, sT, simd >= 3);
        return;
    }
    if (simd == 1) {
        rope_keys_avx2(kind, codes, Tc, H, h, s, c, cos_t, sin_t, out_kind, out, sT);
        return;
    }
#endif
    const int64_t isz = out_kind == OUT_F32 ? 4 : 2;
    for (int64_t t = 0; t < Tc; t++)
        for (int64_t j = 0; j < H; j++)
            rope_head_scalar(kind, codes + (t * H + j) * 2 * h, h, 0, s + j * 2 * h, c ? c + j * 2 * h : 0,
                             cos_t + t * h, sin_t + t * h, out_kind, out + t * sT + j * 2 * h * isz);
}

static int check_out(int out_kind) {
    if (out_kind != OUT_F32 && out_kind != OUT_F16 && !IS_BF16(out_kind))
        return -1;
    if (out_kind == OUT_F16 && !LMC_HAVE_F16)
        return -2; /* no float16 rounding in this build's scalar path: the caller uses torch */
    return 0;
}

/* Whether n indices are strictly increasing and below total (fp8 version 2's exact elements). */
static int exact_ok(const uint32_t *idx, int64_t n, int64_t total) {
    for (int64_t i = 0; i < n; i++)
        if ((int64_t)idx[i] >= total || (i && idx[i] <= idx[i - 1]))
            return 0;
    return 1;
}

/* Write exact elements e, e + 1, ... whose index is below end (the next layer's first) into one
 * layer's key rows: index idx - start is element (idx - start) % HD of row (idx - start) / HD,
 * rows sT bytes apart from out. Returns the first element not written. */
static int64_t put_exact(uint8_t *out, int64_t sT, const uint32_t *idx, const uint8_t *vals, int64_t e, int64_t n,
                         int64_t start, int64_t end, int64_t HD, int64_t isz) {
    for (; e < n && (int64_t)idx[e] < end; e++) {
        const int64_t rest = (int64_t)idx[e] - start;
        memcpy(out + (rest / HD) * sT + (rest % HD) * isz, vals + e * isz, (size_t)isz);
    }
    return e;
}

/* fp8 / int8: codes [L, P, Tc, H, D] (one byte each); key scales sk and centres ck (or NULL)
 * [L, H * D], value scales sv [L, Tc, Hs] (P == 2; Hs is H, or 1: one per token). With cos_t
 * and sin_t ([Tc, D / 2], or both NULL) the keys are rotated by RoPE after centre and scale, in
 * the same pass (rope_keys). Row (l, p, t) of the output starts at out + l * sL + p * sP +
 * t * sT (bytes) and holds H * D contiguous elements. ex_n exact key elements (fp8 version 2:
 * strictly increasing indices ex_idx into the keys [L, Tc, H * D], values ex_vals in the output
 * dtype) then replace decoded ones, a layer at a time while its keys are still in cache.
 * Returns 0, or a negative number, having written nothing, for arguments it does not take (an
 * exact index out of order or range among them; the caller then decodes with torch). */
int lmc_dq_scaled(int kind, const uint8_t *codes, int64_t L, int64_t P, int64_t Tc, int64_t H, int64_t D,
                  const float *sk, const float *ck, const float *sv, int64_t Hs, const float *cos_t,
                  const float *sin_t, const uint32_t *ex_idx, const uint8_t *ex_vals, int64_t ex_n, int out_kind,
                  uint8_t *out, int64_t sL, int64_t sP, int64_t sT, int simd) {
    if (check_out(out_kind) || (kind != CODE_FP8 && kind != CODE_INT8) || P < 1 || P > 2 || D < 1)
        return -1;
    if (P == 2 && Hs != 1 && Hs != H)
        return -1;
    if ((cos_t != 0) != (sin_t != 0) || (cos_t && D % 2))
        return -1;
    const int64_t HD = H * D, isz = out_kind == OUT_F32 ? 4 : 2;
    if (ex_n < 0 || (ex_n && !exact_ok(ex_idx, ex_n, L * Tc * HD)))
        return -1;
    int64_t e = 0;
    for (int64_t l = 0; l < L; l++) {
        for (int64_t p = 0; p < P; p++) {
            if (p == 0 && cos_t) {
                rope_keys(simd, kind, codes + l * P * Tc * HD, Tc, H, D / 2, sk + l * HD, ck ? ck + l * HD : 0, cos_t,
                          sin_t, out_kind, out + l * sL, sT);
            } else {
                for (int64_t t = 0; t < Tc; t++) {
                    const uint8_t *codes_row = codes + ((l * P + p) * Tc + t) * HD;
                    uint8_t *o = out + l * sL + p * sP + t * sT;
                    if (p == 0) {
                        row(simd, kind, codes_row, HD, sk + l * HD, ck ? ck + l * HD : 0, 0.f, 0.f, 0, out_kind, o);
                    } else if (Hs == 1) { /* one scale for the whole row: one run, the same products */
                        row(simd, kind, codes_row, HD, 0, 0, sv[l * Tc + t], 0.f, 0, out_kind, o);
                    } else {
                        for (int64_t h = 0; h < H; h++)
                            row(simd, kind, codes_row + h * D, D, 0, 0, sv[(l * Tc + t) * H + h], 0.f, 0, out_kind,
                                o + h * D * isz);
                    }
                }
            }
            if (p == 0 && ex_n)
                e = put_exact(out + l * sL, sT, ex_idx, ex_vals, e, ex_n, l * Tc * HD, (l + 1) * Tc * HD, HD, isz);
        }
    }
    return 0;
}

/* Codes i0 .. i0 + n - 1 of the int4 nibble planes (code i < half: low nibble of byte i; else the
 * high nibble of byte i - half) into out, as row() does. */
static void nibble_row(int simd, const uint8_t *packed, int64_t half, int64_t i0, int64_t n, const float *s,
                       const float *c, float s1, float c1, int out_kind, uint8_t *out) {
    const int64_t isz = out_kind == OUT_F32 ? 4 : 2;
    int64_t lo = i0 >= half ? 0 : (i0 + n <= half ? n : half - i0);
    if (lo)
        row(simd, NIB_LO, packed + i0, lo, s, c, s1, c1, 1, out_kind, out);
    if (lo < n)
        row(simd, NIB_HI, packed + i0 + lo - half, n - lo, s ? s + lo : 0, c ? c + lo : 0, s1, c1, 1, out_kind,
            out + lo * isz);
}

/* int4 (body version 1): 4-bit codes in two nibble planes (``half`` bytes each). Keys: codes
 * [L, ngk, gk, H, D], minimums then steps mk [2, L, ngk, H * D]; values: codes [L, T, H, ngv,
 * gv] after the keys', mv [2, L, T, H, ngv]. Output rows as lmc_dq_scaled's. */
int lmc_dq_int4(const uint8_t *packed, int64_t half, int64_t L, int64_t P, int64_t T, int64_t H, int64_t D,
                int64_t gk, int64_t gv, const float *mk, const float *mv, int out_kind, uint8_t *out, int64_t sL,
                int64_t sP, int64_t sT, int simd) {
    if (check_out(out_kind) || gk < 1 || gv < 1 || gv > D || P < 1 || P > 2)
        return -1;
    const int64_t HD = H * D, isz = out_kind == OUT_F32 ? 4 : 2;
    const int64_t ngk = (T + gk - 1) / gk, ngv = (D + gv - 1) / gv;
    const int64_t nk_codes = L * ngk * gk * HD;
    const int64_t nk_meta = L * ngk * HD, nv_meta = L * T * H * ngv;
    if (2 * half < nk_codes + (P > 1 ? L * T * H * ngv * gv : 0))
        return -1;
    for (int64_t l = 0; l < L; l++) {
        for (int64_t t = 0; t < T; t++) {
            const int64_t g = t / gk, j = t % gk;
            const float *lo = mk + (l * ngk + g) * HD, *st = mk + nk_meta + (l * ngk + g) * HD;
            nibble_row(simd, packed, half, ((l * ngk + g) * gk + j) * HD, HD, st, lo, 0.f, 0.f, out_kind,
                       out + l * sL + t * sT);
        }
        if (P < 2)
            continue;
        for (int64_t t = 0; t < T; t++) {
            uint8_t *o = out + l * sL + sP + t * sT;
            for (int64_t h = 0; h < H; h++) {
                for (int64_t g = 0; g < ngv; g++) {
                    const int64_t m = ((l * T + t) * H + h) * ngv + g, d0 = g * gv;
                    nibble_row(simd, packed, half, nk_codes + m * gv, D - d0 < gv ? D - d0 : gv, 0, 0, mv[nv_meta + m],
                               mv[m], out_kind, o + (h * D + d0) * isz);
                }
            }
        }
    }
    return 0;
}

/* RoPE on float32 keys in place (fp8 body version 2 rotates its decoded keys again): k is
 * [n, T, H, D] (T, H, D contiguous; sn floats between one n and the next), cos and sin [T, D / 2]; rotate-half pairs a = k[..., :D/2],
 * b = k[..., D/2:]: a' = a*cos - b*sin, b' = b*cos + a*sin, each product rounded to float32 and
 * never fused (-ffp-contract=off), exactly as lmcache.serde.quant._rotate_keys computes it. */
int lmc_dq_rope(float *k, int64_t n, int64_t sn, int64_t T, int64_t H, int64_t D, const float *cos_t,
                const float *sin_t) {
    if (D % 2 || n < 0 || T < 0 || H < 0)
        return -1;
    const int64_t h = D / 2;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t t = 0; t < T; t++) {
            const float *c = cos_t + t * h, *s = sin_t + t * h;
            for (int64_t j = 0; j < H; j++) {
                float *a = k + i * sn + (t * H + j) * D, *b = a + h;
                for (int64_t d = 0; d < h; d++) {
                    const float ac = a[d] * c[d], bs = b[d] * s[d], bc = b[d] * c[d], as = a[d] * s[d];
                    a[d] = ac - bs;
                    b[d] = bc + as;
                }
            }
        }
    }
    return 0;
}

