/*
 * The cachegen codec's rANS coder and dequantizer in C (see lmcache/serde/cachegen_native.py).
 *
 * Symbols are the chunk's quantized values in chunk order [layer, part, token, head, dim],
 * flattened; symbol i belongs to stream i % S and is decoded at step i / S, so one step
 * decodes S consecutive symbols and writes S consecutive output elements. Streams are 32-bit
 * rANS states in [2^16, 2^32) with 12-bit probabilities; renormalization moves 16-bit words,
 * read in one shared sequence in the order the decoder needs them (step by step, stream by
 * stream). The numpy code in cachegen.py does exactly the same arithmetic: both produce
 * identical words and identical output bytes (a test checks it).
 *
 * Built with -ffp-contract=off: a fused multiply-add would round differently from numpy.
 */
#include <stdint.h>
#include <string.h>

#define PROB_BITS 12
#define PROB_SCALE (1u << PROB_BITS)
#define RANS_LOW (1u << 16)
#define HALF 127

enum { OUT_SYMBOLS = 0, OUT_F32 = 1, OUT_BF16 = 2 };
/* simd levels of lmc_cg_decode: the CPU's best, scalar, AVX-512 with vpgatherdd or scalar loads, AVX2 */
enum { SIMD_AUTO = -1, SIMD_SCALAR = 0, SIMD_GATHER = 1, SIMD_LOADS = 2, SIMD_AVX2 = 3 };

/*
 * Frequency tables [n_tables][256] from their packed form (per table: first used symbol,
 * uint8; count, uint16; count uint16 frequencies). Returns the bytes read, or -1 when the
 * input is short or a table is damaged (out of the alphabet, or not summing to 4096).
 */
int64_t lmc_cg_unpack_tables(const uint8_t *buf, int64_t len, int64_t n_tables, uint16_t *freq) {
    int64_t off = 0;
    memset(freq, 0, (size_t)n_tables * 256 * 2);
    for (int64_t t = 0; t < n_tables; t++) {
        if (off + 3 > len) return -1;
        uint32_t lo = buf[off], n = (uint32_t)buf[off + 1] | ((uint32_t)buf[off + 2] << 8);
        off += 3;
        if (lo + n > 256 || off + 2 * (int64_t)n > len) return -1;
        uint32_t sum = 0;
        for (uint32_t k = 0; k < n; k++) {
            uint16_t f = (uint16_t)(buf[off + 2 * k] | (buf[off + 2 * k + 1] << 8));
            freq[t * 256 + lo + k] = f;
            sum += f;
        }
        if (sum != PROB_SCALE) return -1;
        off += 2 * n;
    }
    return off;
}

/*
 * Decode table entry: symbol (8 bits), frequency - 1 (12 bits), slot - cumulative (12 bits).
 * One table is PROB_SCALE entries; TABLE_SLACK more let the AVX-512 builder write whole
 * vectors past a symbol's last slot (the next symbol, or the slack, takes them).
 */
#define TABLE_SLACK 16
#define TABLE_SIZE (PROB_SCALE + TABLE_SLACK)

/* The decode table of one frequency table f[256] into o; -1 when f does not sum to 4096. */
static int build_table_scalar(const uint16_t *f, uint32_t *o) {
    uint32_t cum = 0;
    for (uint32_t s = 0; s < 256; s++) {
        uint32_t fs = f[s];
        if (fs == 0) continue;
        if (cum + fs > PROB_SCALE) return -1;
        for (uint32_t k = 0; k < fs; k++) o[cum + k] = s | ((fs - 1) << 8) | (k << 20);
        cum += fs;
    }
    return cum == PROB_SCALE ? 0 : -1;
}

/*
 * float16 bits to float32, exactly as numpy's astype (subnormals normalized; NaN payloads kept,
 * signalling ones too): the per-lane means, steps and scales of a body (numpy's float16 loop
 * cost a tenth of a chunk's decode).
 */
void lmc_cg_half_to_float(const uint16_t *h, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t x = h[i], sign = (x & 0x8000u) << 16, e = (x >> 10) & 0x1F, m = x & 0x3FF, u;
        if (e == 0x1F) {
            u = sign | 0x7F800000u | (m << 13);
        } else if (e != 0) {
            u = sign | ((e + 112) << 23) | (m << 13);
        } else if (m == 0) {
            u = sign;
        } else { /* subnormal: normalize */
            uint32_t k = 0;
            while (!(m & 0x400)) {
                m <<= 1;
                k++;
            }
            u = sign | ((113 - k) << 23) | ((m & 0x3FF) << 13);
        }
        memcpy(out + i, &u, 4);
    }
}

/*
 * Log codes to float32 (body version 3): out[r * cols + c] = values[base[r] - lo + codes[r *
 * cols + c]], values being every code's value from code lo; the caller checked each base.
 */
void lmc_cg_log_values(const int16_t *base, const uint8_t *codes, int64_t rows, int64_t cols, const float *values,
                       int64_t lo, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *v = values + (base[r] - lo);
        for (int64_t c = 0; c < cols; c++) out[r * cols + c] = v[codes[r * cols + c]];
    }
}

static inline uint16_t bf16_of(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even, as torch (values are finite) */
    return (uint16_t)(u >> 16);
}

/* One rANS decode step of stream state *x with table tb; returns the symbol. */
#define DECODE_ONE(x, tb, sym)                                                              \
    do {                                                                                    \
        uint32_t e_ = (tb)[(x) & (PROB_SCALE - 1)];                                         \
        (sym) = e_ & 0xFF;                                                                  \
        (x) = ((e_ >> 8) & 0xFFF) * ((x) >> PROB_BITS) + ((x) >> PROB_BITS) + (e_ >> 20);  \
    } while (0)

/*
 * One row (hd consecutive symbols of one layer-part and token) starting at stream *s. kind:
 * OUT_SYMBOLS, OUT_F32 or OUT_BF16 (a constant at every call: the compiler specializes).
 * mode: 0 precise token (q * pscale), 1 regular (ref + q * step). Words are read unchecked:
 * the caller knows hd more words exist.
 */
static inline __attribute__((always_inline)) void row(uint32_t *st, int64_t S, int64_t *s_io, const uint16_t *words,
                                                      int64_t *ptr_io, const uint32_t *tb, int64_t hd, int kind,
                                                      int mode, const float *mul, const float *add, float *keep,
                                                      void *out) {
    int64_t s = *s_io, ptr = *ptr_io;
    for (int64_t c = 0; c < hd; c++) {
        uint32_t x = st[s], sym;
        DECODE_ONE(x, tb, sym);
        uint32_t need = x < RANS_LOW;
        uint32_t w = words[ptr];
        x = need ? (x << 16) | w : x;
        ptr += need;
        st[s] = x;
        if (++s == S) s = 0;
        if (kind == OUT_SYMBOLS) {
            ((uint8_t *)out)[c] = (uint8_t)sym;
        } else {
            float q = (float)((int)sym - HALF);
            float v = mode ? add[c] + q * mul[c] : q * mul[c];
            if (keep) keep[c] = v;
            if (kind == OUT_F32)
                ((float *)out)[c] = v;
            else
                ((uint16_t *)out)[c] = bf16_of(v);
        }
    }
    *s_io = s;
    *ptr_io = ptr;
}

/* The same row with each word read checked (the last rows of a value). */
static int row_checked(uint32_t *st, int64_t S, int64_t *s_io, const uint16_t *words, int64_t n_words, int64_t *ptr_io,
                       const uint32_t *tb, int64_t hd, int kind, int mode, const float *mul, const float *add,
                       float *keep, void *out) {
    int64_t s = *s_io, ptr = *ptr_io;
    for (int64_t c = 0; c < hd; c++) {
        uint32_t x = st[s], sym;
        DECODE_ONE(x, tb, sym);
        if (x < RANS_LOW) {
            if (ptr >= n_words) return -1;
            x = (x << 16) | words[ptr++];
        }
        st[s] = x;
        if (++s == S) s = 0;
        if (kind == OUT_SYMBOLS) {
            ((uint8_t *)out)[c] = (uint8_t)sym;
        } else {
            float q = (float)((int)sym - HALF);
            float v = mode ? add[c] + q * mul[c] : q * mul[c];
            if (keep) keep[c] = v;
            if (kind == OUT_F32)
                ((float *)out)[c] = v;
            else
                ((uint16_t *)out)[c] = bf16_of(v);
        }
    }
    *s_io = s;
    *ptr_io = ptr;
    return 0;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LMC_X86 1
#define AVX512 __attribute__((target("avx512f,popcnt")))

/* Four table entries, of the states at sx, by scalar loads. */
#define LOAD4(tb, sx)                                                                                 \
    _mm_insert_epi32(_mm_insert_epi32(_mm_insert_epi32(_mm_cvtsi32_si128((int)(tb)[(sx)[0] & 4095]), \
                                                       (int)(tb)[(sx)[1] & 4095], 1),                 \
                                      (int)(tb)[(sx)[2] & 4095], 2),                                  \
                     (int)(tb)[(sx)[3] & 4095], 3)

/*
 * The table entries of the 16 states at sx: by vpgatherdd, or (loads) by scalar loads (the same
 * entries; on AMD Zen 4, whose vpgatherdd is microcoded, a chunk decodes about 1.3x faster so).
 */
static inline __attribute__((always_inline)) AVX512 __m512i fetch16(const uint32_t *tb, const uint32_t *sx, int loads) {
    if (!loads) {
        __m512i slot = _mm512_and_si512(_mm512_loadu_si512((const void *)sx), _mm512_set1_epi32(PROB_SCALE - 1));
        return _mm512_i32gather_epi32(slot, (const void *)tb, 4);
    }
    __m512i e = _mm512_inserti32x4(_mm512_castsi128_si512(LOAD4(tb, sx)), LOAD4(tb, sx + 4), 1);
    return _mm512_inserti32x4(_mm512_inserti32x4(e, LOAD4(tb, sx + 8), 2), LOAD4(tb, sx + 12), 3);
}

/*
 * row() for 16 streams at a time (AVX-512F): the same arithmetic lane by lane. The words the
 * 16 streams need are the next popcount(need) words, expanded into the lanes that renormalize
 * in stream order, which is the order the scalar loop reads them in. A stretch of whole vectors
 * (up to the row's end or the streams' wrap) is software-pipelined: the next vector's table
 * entries are fetched before this one renormalizes, which keeps more fetches in flight than
 * the out-of-order window alone does (bfloat16 rows about 1.15x faster on Zen 4).
 * loads: see fetch16().
 */
static inline __attribute__((always_inline)) AVX512 void row16(uint32_t *st, int64_t S, int64_t *s_io,
                                                                const uint16_t *words, int64_t *ptr_io,
                                                                const uint32_t *tb, int64_t hd, int kind, int mode,
                                                                int loads, const float *mul, const float *add,
                                                                float *keep, void *out) {
    int64_t s = *s_io, ptr = *ptr_io, c = 0;
    const __m512i mask12 = _mm512_set1_epi32(PROB_SCALE - 1), m8 = _mm512_set1_epi32(0xFF);
    const __m512i low = _mm512_set1_epi32(RANS_LOW), half = _mm512_set1_epi32(HALF);
    const __m512i round = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    while (c < hd) {
        int64_t nv = (hd - c) / 16, room = (S - s) / 16;
        if (room < nv) nv = room;
        if (nv > 0) {
            /* the next vector's table entries are fetched before this one renormalizes */
            __m512i e_next = fetch16(tb, st + s, loads);
            for (int64_t j = 0; j < nv; j++) {
                __m512i x = _mm512_loadu_si512((const void *)(st + s));
                __m512i e = e_next;
                if (j + 1 < nv) e_next = fetch16(tb, st + s + 16, loads);
                __m512i sym = _mm512_and_si512(e, m8);
                __m512i f1 = _mm512_and_si512(_mm512_srli_epi32(e, 8), mask12);
                __m512i xs = _mm512_srli_epi32(x, PROB_BITS);
                x = _mm512_add_epi32(_mm512_add_epi32(_mm512_mullo_epi32(f1, xs), xs), _mm512_srli_epi32(e, 20));
                __mmask16 need = _mm512_cmplt_epu32_mask(x, low);
                __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(words + ptr)));
                w = _mm512_maskz_expand_epi32(need, w);
                x = _mm512_mask_or_epi32(x, need, _mm512_slli_epi32(x, 16), w);
                ptr += __builtin_popcount((unsigned)need);
                _mm512_storeu_si512((void *)(st + s), x);
                if (kind == OUT_SYMBOLS) {
                    _mm_storeu_si128((__m128i *)((uint8_t *)out + c), _mm512_cvtepi32_epi8(sym));
                } else {
                    __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(sym, half));
                    __m512 v = _mm512_mul_ps(q, _mm512_loadu_ps(mul + c));
                    if (mode) v = _mm512_add_ps(_mm512_loadu_ps(add + c), v);
                    if (keep) _mm512_storeu_ps(keep + c, v);
                    if (kind == OUT_F32) {
                        _mm512_storeu_ps((float *)out + c, v);
                    } else {
                        __m512i u = _mm512_castps_si512(v);
                        u = _mm512_add_epi32(u, _mm512_add_epi32(round, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
                        _mm256_storeu_si256((__m256i *)((uint16_t *)out + c), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
                    }
                }
                c += 16;
                s += 16;
            }
            if (s == S) s = 0;
        } else { /* a row's tail or a stream wrap: one symbol the scalar way */
            uint32_t x = st[s], sym1;
            DECODE_ONE(x, tb, sym1);
            if (x < RANS_LOW) x = (x << 16) | words[ptr++];
            st[s] = x;
            if (++s == S) s = 0;
            if (kind == OUT_SYMBOLS) {
                ((uint8_t *)out)[c] = (uint8_t)sym1;
            } else {
                float q = (float)((int)sym1 - HALF);
                float v = mode ? add[c] + q * mul[c] : q * mul[c];
                if (keep) keep[c] = v;
                if (kind == OUT_F32)
                    ((float *)out)[c] = v;
                else
                    ((uint16_t *)out)[c] = bf16_of(v);
            }
            c++;
        }
    }
    *s_io = s;
    *ptr_io = ptr;
}

/* row16() specialized for each output kind, mode and fetch (constants: the compiler drops the rest). */
#define ROW16_AS(kind_, mode_, loads_) \
    row16(st, S, s_io, words, ptr_io, tb, hd, kind_, mode_, loads_, mul, add, keep, out)

static AVX512 void row16_any(uint32_t *st, int64_t S, int64_t *s_io, const uint16_t *words, int64_t *ptr_io,
                             const uint32_t *tb, int64_t hd, int kind, int mode, int loads, const float *mul,
                             const float *add, float *keep, void *out) {
    if (loads) {
        if (kind == OUT_SYMBOLS)
            ROW16_AS(OUT_SYMBOLS, 0, 1);
        else if (kind == OUT_F32)
            mode ? ROW16_AS(OUT_F32, 1, 1) : ROW16_AS(OUT_F32, 0, 1);
        else
            mode ? ROW16_AS(OUT_BF16, 1, 1) : ROW16_AS(OUT_BF16, 0, 1);
    } else {
        if (kind == OUT_SYMBOLS)
            ROW16_AS(OUT_SYMBOLS, 0, 0);
        else if (kind == OUT_F32)
            mode ? ROW16_AS(OUT_F32, 1, 0) : ROW16_AS(OUT_F32, 0, 0);
        else
            mode ? ROW16_AS(OUT_BF16, 1, 0) : ROW16_AS(OUT_BF16, 0, 0);
    }
}

/* build_table_scalar() a vector of 16 slots at a time (the same entries). */
static AVX512 int build_table16(const uint16_t *f, uint32_t *o) {
    const __m512i iota = _mm512_slli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 20);
    const __m512i next = _mm512_set1_epi32(16 << 20);
    uint32_t cum = 0;
    for (uint32_t s = 0; s < 256; s++) {
        uint32_t fs = f[s];
        if (fs == 0) continue;
        if (cum + fs > PROB_SCALE) return -1;
        __m512i v = _mm512_add_epi32(_mm512_set1_epi32((int)(s | ((fs - 1) << 8))), iota);
        for (uint32_t k = 0; k < fs; k += 16) { /* up to 15 entries past the run: TABLE_SLACK */
            _mm512_storeu_si512((void *)(o + cum + k), v);
            v = _mm512_add_epi32(v, next);
        }
        cum += fs;
    }
    return cum == PROB_SCALE ? 0 : -1;
}

#define AVX2 __attribute__((target("avx2,popcnt")))

/* Per renormalization mask of 8 lanes: lane i takes word popcount(mask & ((1 << i) - 1)). */
static _Alignas(32) uint32_t expand8[256][8];

static void init_expand8(void) {
    for (int m = 0; m < 256; m++)
        for (int i = 0; i < 8; i++) expand8[m][i] = (uint32_t)__builtin_popcount((unsigned)m & ((1u << i) - 1));
}

/*
 * row() for 8 streams at a time with AVX2 (CPUs without AVX-512F): the same arithmetic lane by
 * lane; table entries by scalar loads, the words expanded into the lanes that renormalize by a
 * permutation looked up by their mask (AVX2 has no vpexpandd).
 */
static inline __attribute__((always_inline)) AVX2 void row8(uint32_t *st, int64_t S, int64_t *s_io,
                                                             const uint16_t *words, int64_t *ptr_io,
                                                             const uint32_t *tb, int64_t hd, int kind, int mode,
                                                             const float *mul, const float *add, float *keep,
                                                             void *out) {
    int64_t s = *s_io, ptr = *ptr_io, c = 0;
    const __m256i mask12 = _mm256_set1_epi32(PROB_SCALE - 1), m8 = _mm256_set1_epi32(0xFF);
    const __m256i bias = _mm256_set1_epi32((int)0x80000000u), low = _mm256_set1_epi32((int)(RANS_LOW ^ 0x80000000u));
    const __m256i half = _mm256_set1_epi32(HALF), round = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
    while (c < hd) {
        if (c + 8 <= hd && s + 8 <= S) {
            const uint32_t *sx = st + s;
            __m256i x = _mm256_loadu_si256((const __m256i *)sx);
            __m256i e = _mm256_inserti128_si256(_mm256_castsi128_si256(LOAD4(tb, sx)), LOAD4(tb, sx + 4), 1);
            __m256i sym = _mm256_and_si256(e, m8);
            __m256i f1 = _mm256_and_si256(_mm256_srli_epi32(e, 8), mask12);
            __m256i xs = _mm256_srli_epi32(x, PROB_BITS);
            x = _mm256_add_epi32(_mm256_add_epi32(_mm256_mullo_epi32(f1, xs), xs), _mm256_srli_epi32(e, 20));
            __m256i need = _mm256_cmpgt_epi32(low, _mm256_xor_si256(x, bias)); /* x < RANS_LOW, unsigned */
            unsigned m = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(need));
            __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(words + ptr)));
            w = _mm256_permutevar8x32_epi32(w, _mm256_load_si256((const __m256i *)expand8[m]));
            x = _mm256_blendv_epi8(x, _mm256_or_si256(_mm256_slli_epi32(x, 16), w), need);
            ptr += __builtin_popcount(m);
            _mm256_storeu_si256((__m256i *)sx, x);
            if (kind == OUT_SYMBOLS) {
                __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(sym), _mm256_extracti128_si256(sym, 1));
                _mm_storel_epi64((__m128i *)((uint8_t *)out + c), _mm_packus_epi16(p, p));
            } else {
                __m256 q = _mm256_cvtepi32_ps(_mm256_sub_epi32(sym, half));
                __m256 v = _mm256_mul_ps(q, _mm256_loadu_ps(mul + c));
                if (mode) v = _mm256_add_ps(_mm256_loadu_ps(add + c), v);
                if (keep) _mm256_storeu_ps(keep + c, v);
                if (kind == OUT_F32) {
                    _mm256_storeu_ps((float *)out + c, v);
                } else {
                    __m256i u = _mm256_castps_si256(v);
                    u = _mm256_add_epi32(u, _mm256_add_epi32(round, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
                    u = _mm256_srli_epi32(u, 16);
                    __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
                    _mm_storeu_si128((__m128i *)((uint16_t *)out + c), p);
                }
            }
            c += 8;
            s += 8;
            if (s == S) s = 0;
        } else { /* a row's tail or a stream wrap: one symbol the scalar way */
            uint32_t x = st[s], sym1;
            DECODE_ONE(x, tb, sym1);
            if (x < RANS_LOW) x = (x << 16) | words[ptr++];
            st[s] = x;
            if (++s == S) s = 0;
            if (kind == OUT_SYMBOLS) {
                ((uint8_t *)out)[c] = (uint8_t)sym1;
            } else {
                float q = (float)((int)sym1 - HALF);
                float v = mode ? add[c] + q * mul[c] : q * mul[c];
                if (keep) keep[c] = v;
                if (kind == OUT_F32)
                    ((float *)out)[c] = v;
                else
                    ((uint16_t *)out)[c] = bf16_of(v);
            }
            c++;
        }
    }
    *s_io = s;
    *ptr_io = ptr;
}

#define ROW8_AS(kind_, mode_) row8(st, S, s_io, words, ptr_io, tb, hd, kind_, mode_, mul, add, keep, out)

static AVX2 void row8_any(uint32_t *st, int64_t S, int64_t *s_io, const uint16_t *words, int64_t *ptr_io,
                          const uint32_t *tb, int64_t hd, int kind, int mode, const float *mul, const float *add,
                          float *keep, void *out) {
    if (kind == OUT_SYMBOLS)
        ROW8_AS(OUT_SYMBOLS, 0);
    else if (kind == OUT_F32)
        mode ? ROW8_AS(OUT_F32, 1) : ROW8_AS(OUT_F32, 0);
    else
        mode ? ROW8_AS(OUT_BF16, 1) : ROW8_AS(OUT_BF16, 0);
}

/*
 * The SIMD level a decode uses when not told (SIMD_AUTO): with AVX-512F, 2 (table entries by
 * scalar loads) on AMD CPUs, whose vpgatherdd is slow, else 1 (vpgatherdd); without it, 3 where
 * the CPU has AVX2, else 0.
 */
static int simd_level(void) {
    static int level = -1; /* a benign race: every thread computes the same values */
    int l = __atomic_load_n(&level, __ATOMIC_ACQUIRE);
    if (l < 0) {
        __builtin_cpu_init();
        init_expand8();
        if (__builtin_cpu_supports("avx512f"))
            l = __builtin_cpu_is("amd") ? SIMD_LOADS : SIMD_GATHER;
        else
            l = __builtin_cpu_supports("avx2") ? SIMD_AVX2 : SIMD_SCALAR;
        __atomic_store_n(&level, l, __ATOMIC_RELEASE); /* after expand8 is filled */
    }
    return l;
}
#else
static int simd_level(void) { return 0; }
#endif

/* The decode table of f into o (TABLE_SIZE entries), with the builder simd allows. */
static int build_table(const uint16_t *f, uint32_t *o, int simd) {
#ifdef LMC_X86
    if (simd) return build_table16(f, o);
#endif
    return build_table_scalar(f, o);
}

/*
 * Rotate one key row back by RoPE (body version 2): r holds the row's hd dequantized values
 * (float32), heads of dim channels, channel c paired with c + dim / 2 (the rotate-half
 * convention); cs and sn are the token's cos and sin per pair. out gets
 *   lo = a * cos - b * sin,  hi = b * cos + a * sin
 * in kind's type: each product rounded, then the sum (no FMA), as numpy and Triton compute it.
 */
static void rope_store_scalar(const float *r, int64_t hd, int64_t dim, const float *cs, const float *sn, int kind,
                              void *out) {
    int64_t h2 = dim / 2;
    for (int64_t b = 0; b < hd; b += dim) {
        for (int64_t c = 0; c < h2; c++) {
            float a = r[b + c], z = r[b + c + h2];
            float lo = a * cs[c] - z * sn[c];
            float hi = z * cs[c] + a * sn[c];
            if (kind == OUT_F32) {
                ((float *)out)[b + c] = lo;
                ((float *)out)[b + c + h2] = hi;
            } else {
                ((uint16_t *)out)[b + c] = bf16_of(lo);
                ((uint16_t *)out)[b + c + h2] = bf16_of(hi);
            }
        }
    }
}

#ifdef LMC_X86
static AVX512 void rope_store16(const float *r, int64_t hd, int64_t dim, const float *cs, const float *sn, int kind,
                                void *out) {
    int64_t h2 = dim / 2;
    const __m512i round = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    for (int64_t b = 0; b < hd; b += dim) {
        for (int64_t c = 0; c < h2; c += 16) {
            __m512 a = _mm512_loadu_ps(r + b + c), z = _mm512_loadu_ps(r + b + c + h2);
            __m512 co = _mm512_loadu_ps(cs + c), si = _mm512_loadu_ps(sn + c);
            __m512 lo = _mm512_sub_ps(_mm512_mul_ps(a, co), _mm512_mul_ps(z, si));
            __m512 hi = _mm512_add_ps(_mm512_mul_ps(z, co), _mm512_mul_ps(a, si));
            if (kind == OUT_F32) {
                _mm512_storeu_ps((float *)out + b + c, lo);
                _mm512_storeu_ps((float *)out + b + c + h2, hi);
            } else {
                __m512i u = _mm512_castps_si512(lo), v = _mm512_castps_si512(hi);
                u = _mm512_add_epi32(u, _mm512_add_epi32(round, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
                v = _mm512_add_epi32(v, _mm512_add_epi32(round, _mm512_and_si512(_mm512_srli_epi32(v, 16), one)));
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + b + c), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + b + c + h2),
                                    _mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
            }
        }
    }
}
#endif

#ifdef LMC_X86
/* rope_store_scalar() 8 pairs at a time (AVX2; no FMA: the target has none). */
static AVX2 void rope_store8(const float *r, int64_t hd, int64_t dim, const float *cs, const float *sn, int kind,
                             void *out) {
    int64_t h2 = dim / 2;
    const __m256i round = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
    for (int64_t b = 0; b < hd; b += dim) {
        for (int64_t c = 0; c < h2; c += 8) {
            __m256 a = _mm256_loadu_ps(r + b + c), z = _mm256_loadu_ps(r + b + c + h2);
            __m256 co = _mm256_loadu_ps(cs + c), si = _mm256_loadu_ps(sn + c);
            __m256 lo = _mm256_sub_ps(_mm256_mul_ps(a, co), _mm256_mul_ps(z, si));
            __m256 hi = _mm256_add_ps(_mm256_mul_ps(z, co), _mm256_mul_ps(a, si));
            if (kind == OUT_F32) {
                _mm256_storeu_ps((float *)out + b + c, lo);
                _mm256_storeu_ps((float *)out + b + c + h2, hi);
            } else {
                __m256i u = _mm256_castps_si256(lo), v = _mm256_castps_si256(hi);
                u = _mm256_srli_epi32(
                    _mm256_add_epi32(u, _mm256_add_epi32(round, _mm256_and_si256(_mm256_srli_epi32(u, 16), one))), 16);
                v = _mm256_srli_epi32(
                    _mm256_add_epi32(v, _mm256_add_epi32(round, _mm256_and_si256(_mm256_srli_epi32(v, 16), one))), 16);
                _mm_storeu_si128((__m128i *)((uint16_t *)out + b + c),
                                 _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
                _mm_storeu_si128((__m128i *)((uint16_t *)out + b + c + h2),
                                 _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
            }
        }
    }
}
#endif

/* simd: SIMD_* level of the decode (AVX-512 and AVX2 rotate 16 or 8 pairs a step where they fit). */
static void rope_store(const float *r, int64_t hd, int64_t dim, const float *cs, const float *sn, int kind, void *out,
                       int simd) {
#ifdef LMC_X86
    if ((simd == SIMD_GATHER || simd == SIMD_LOADS) && (dim / 2) % 16 == 0) {
        rope_store16(r, hd, dim, cs, sn, kind, out);
        return;
    }
    if (simd == SIMD_AVX2 && (dim / 2) % 8 == 0) {
        rope_store8(r, hd, dim, cs, sn, kind, out);
        return;
    }
#endif
    rope_store_scalar(r, hd, dim, cs, sn, kind, out);
}

#ifdef LMC_X86
#define row16_dispatch row16_any
#define row8_dispatch row8_any
#else
#define row16_dispatch(...) ((void)0)
#define row8_dispatch(...) ((void)0)
#endif

/* One row of hd symbols into o_ as ok_ (the loop the level picks; a constant ok_ folds the
 * scalar loop's switch away). */
#define ROW_INTO(o_, ok_, mode_, mul_, add_, keep_)                                                                  \
    do {                                                                                                             \
        if (ptr + hd > n_words) {                                                                                    \
            if (row_checked(st, S, &s, words, n_words, &ptr, tb, hd, ok_, mode_, mul_, add_, keep_, o_)) return -1;  \
        } else if (avx512) {                                                                                         \
            row16_dispatch(st, S, &s, words, &ptr, tb, hd, ok_, mode_, loads, mul_, add_, keep_, o_);                \
        } else if (simd == SIMD_AVX2) {                                                                              \
            row8_dispatch(st, S, &s, words, &ptr, tb, hd, ok_, mode_, mul_, add_, keep_, o_);                        \
        } else if ((ok_) == OUT_SYMBOLS) {                                                                           \
            row(st, S, &s, words, &ptr, tb, hd, OUT_SYMBOLS, mode_, mul_, add_, keep_, o_);                          \
        } else if ((ok_) == OUT_F32) {                                                                               \
            row(st, S, &s, words, &ptr, tb, hd, OUT_F32, mode_, mul_, add_, keep_, o_);                              \
        } else {                                                                                                     \
            row(st, S, &s, words, &ptr, tb, hd, OUT_BF16, mode_, mul_, add_, keep_, o_);                             \
        }                                                                                                            \
    } while (0)

/* A row straight into the output, in its kind. */
#define ROW_ALL_KINDS(mode_, mul_, add_, keep_) ROW_INTO((char *)out + i * esize, out_kind, mode_, mul_, add_, keep_)

/* A row decoded as float32 into dst_ (a key row that RoPE rotates before it is stored). */
#define ROW_F32_INTO(dst_, mode_, mul_, add_, keep_) ROW_INTO(dst_, OUT_F32, mode_, mul_, add_, keep_)

/*
 * Decode the lp * T * hd symbols of S streams. Symbol (lp, t, c) is coded with frequency table
 * freq[2 * lp + regular[t]] (freq: [2 * lp][256]); each layer-part's decode tables are built
 * from them as decoding reaches it, into scratch that stays in L1 while the layer-part's rows
 * use it (a precise tokens' table equal to one built before is reused: body version 3 shares
 * them across layers). out_kind OUT_SYMBOLS writes the symbols (uint8) to out; OUT_F32 /
 * OUT_BF16 write the dequantized values: precise tokens q * pscale[lane], the rest ref + q *
 * step[lane], where ref is mean[lane] (anchor == 0) or the value of the lane's last anchor
 * token (t % anchor == 0). anc is scratch of lp * hd floats (anchor mode only); lane = lp * hd
 * + c. simd: SIMD_AUTO (the CPU's best), SIMD_SCALAR, SIMD_GATHER or SIMD_LOADS (AVX-512), or
 * SIMD_AVX2; a level the CPU lacks falls back to its best; every level writes the same bytes.
 * rcos, rsin (body version 2; NULL otherwise): cos and sin [T][dim / 2] of RoPE's angles at the
 * chunk's relative positions; rows of part 0 (keys: lp % parts == 0) are rotated by them after
 * dequantizing (rope_store), through rowbuf (hd floats). Mean mode only (anchor == 0).
 * Returns 0, -1 when the words run out, -2 when the streams do not end where they should, -4
 * when a frequency table does not sum to 4096.
 */
int lmc_cg_decode(const uint32_t *states_in, int64_t S, const uint16_t *words, int64_t n_words, const uint16_t *freq,
                  int64_t n, int64_t T, int64_t hd, const uint8_t *regular, int64_t anchor, const float *pscale,
                  const float *mean, const float *step, float *anc, int out_kind, void *out, int simd,
                  const float *rcos, const float *rsin, int64_t parts, int64_t dim, float *rowbuf) {
    uint32_t st[4096];
    /* decode tables: [0] the regular tokens', [1] and [2] the precise tokens' (built from ptab_of) */
    _Alignas(64) uint32_t tabs[3][TABLE_SIZE];
    const uint16_t *ptab_of[2] = {NULL, NULL};
    int victim = 0;
    int level = simd_level();
    if (simd < 0 || simd > SIMD_AVX2)
        simd = level;
    else if ((simd == SIMD_GATHER || simd == SIMD_LOADS) && level != SIMD_GATHER && level != SIMD_LOADS)
        simd = level; /* no AVX-512F here: AVX2 or scalar */
    else if (simd == SIMD_AVX2 && level == SIMD_SCALAR)
        simd = SIMD_SCALAR;
    int avx512 = simd == SIMD_GATHER || simd == SIMD_LOADS, loads = simd == SIMD_LOADS;
    if (S <= 0 || S > 4096 || T <= 0 || hd <= 0 || n % (T * hd)) return -3;
    int rope = rcos != NULL && out_kind != OUT_SYMBOLS;
    if (rope && (parts <= 0 || dim <= 0 || dim % 2 || hd % dim || anchor || !rowbuf)) return -3;
    memcpy(st, states_in, (size_t)S * 4);
    int any_regular = 0, any_precise = 0;
    for (int64_t t = 0; t < T; t++) {
        any_regular |= regular[t] != 0;
        any_precise |= regular[t] == 0;
    }
    int64_t ptr = 0, s = 0, lps = n / (T * hd);
    int64_t esize = out_kind == OUT_SYMBOLS ? 1 : out_kind == OUT_F32 ? 4 : 2;
    for (int64_t lp = 0; lp < lps; lp++) {
        const float *ps = pscale ? pscale + lp * hd : NULL, *sp = step ? step + lp * hd : NULL;
        const float *ref = NULL;
        const uint32_t *tables[2] = {NULL, NULL}; /* precise, regular */
        if (any_regular) {
            if (build_table(freq + (2 * lp + 1) * 256, tabs[0], avx512)) return -4;
            tables[1] = tabs[0];
        }
        if (any_precise) {
            const uint16_t *f = freq + 2 * lp * 256;
            int k = ptab_of[0] && !memcmp(ptab_of[0], f, 512) ? 0 : ptab_of[1] && !memcmp(ptab_of[1], f, 512) ? 1 : -1;
            if (k < 0) {
                k = victim;
                victim ^= 1;
                if (build_table(f, tabs[1 + k], avx512)) return -4;
                ptab_of[k] = f;
            }
            tables[0] = tabs[1 + k];
        }
        if (out_kind != OUT_SYMBOLS) ref = anchor ? anc + lp * hd : mean + lp * hd;
        for (int64_t t = 0; t < T; t++) {
            int64_t i = (lp * T + t) * hd;
            const uint32_t *tb = tables[regular[t] != 0];
            if (rope && lp % parts == 0) { /* a key row: decoded, then rotated back by RoPE */
                if (regular[t])
                    ROW_F32_INTO(rowbuf, 1, sp, ref, NULL);
                else
                    ROW_F32_INTO(rowbuf, 0, ps, NULL, NULL);
                rope_store(rowbuf, hd, dim, rcos + t * (dim / 2), rsin + t * (dim / 2), out_kind,
                           (char *)out + i * esize, simd);
            } else if (regular[t]) {
                ROW_ALL_KINDS(1, sp, ref, NULL);
            } else {
                float *keep = (out_kind != OUT_SYMBOLS && anchor && t % anchor == 0) ? anc + lp * hd : NULL;
                ROW_ALL_KINDS(0, ps, NULL, keep);
            }
        }
    }
    if (ptr != n_words) return -2;
    for (int64_t k = 0; k < S; k++)
        if (st[k] != RANS_LOW) return -2;
    return 0;
}

/*
 * Encode n symbols (chunk order) into S streams; the inverse of lmc_cg_decode. freq and cum are
 * [n_tables][256]. Words are written backwards from words + n (room for n words: one at most
 * per symbol); returns how many, which end at words + n. states_out gets S final states.
 */
int64_t lmc_cg_encode(const uint8_t *sym, int64_t n, int64_t S, const uint16_t *freq, const uint16_t *cum, int64_t T,
                      int64_t HD, const uint8_t *regular, uint16_t *words, uint32_t *states_out) {
    uint32_t st[4096];
    if (S <= 0 || S > 4096 || T <= 0 || HD <= 0 || n <= 0 || n % (T * HD)) return -3;
    for (int64_t s = 0; s < S; s++) st[s] = RANS_LOW;
    uint16_t *wp = words + n;
    /* counters instead of divisions: symbol i is (lp, t, c) with stream s = i % S */
    int64_t s = (n - 1) % S, lp = n / (T * HD) - 1, t = T - 1, c = HD - 1;
    for (int64_t i = n - 1; i >= 0; i--) {
        int64_t tbl = (2 * lp + regular[t]) * 256 + sym[i];
        uint32_t f = freq[tbl], cu = cum[tbl];
        if (f == 0) return -1;
        uint32_t x = st[s];
        if (x >= (f << 20)) {
            *--wp = (uint16_t)(x & 0xFFFF);
            x >>= 16;
        }
        st[s] = ((x / f) << PROB_BITS) + (x % f) + cu;
        if (--s < 0) s = S - 1;
        if (--c < 0) {
            c = HD - 1;
            if (--t < 0) {
                t = T - 1;
                lp--;
            }
        }
    }
    memcpy(states_out, st, (size_t)S * 4);
    return (words + n) - wp;
}

/* Symbol counts per table ([2 * lp][256]: precise tokens, then regular ones, per layer-part). */
int lmc_cg_count(const uint8_t *sym, int64_t n, int64_t T, int64_t HD, const uint8_t *regular, int64_t *counts) {
    if (T <= 0 || HD <= 0 || n % (T * HD)) return -3;
    int64_t lps = n / (T * HD);
    memset(counts, 0, (size_t)lps * 2 * 256 * sizeof(int64_t));
    const uint8_t *p = sym;
    for (int64_t lp = 0; lp < lps; lp++) {
        for (int64_t t = 0; t < T; t++) {
            int64_t *row = counts + (2 * lp + regular[t]) * 256;
            for (int64_t c = 0; c < HD; c++) row[p[c]]++;
            p += HD;
        }
    }
    return 0;
}
