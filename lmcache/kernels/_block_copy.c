/*
 * Whole-block copies between a paged KV cache and a contiguous chunk buffer, on the CPU.
 *
 * Built on first use by lmcache.kernels.native_copy (lmcache.native_build). One call copies
 * every entry (a layer's K or V) of every block of a chunk, so Python makes one call per chunk
 * instead of one per block and entry; ctypes releases the GIL for the whole call and no OpenMP
 * team is involved.
 *
 * Entry e's block b starts at entry_addrs[e] + block_ids[b] * strides[e][0] elements and holds
 * [block_size, heads, width] elements with element strides strides[e][1..3] (token, head, dim):
 * head-major blocks (vLLM-CPU's vllm_cpu / vllm_paged) and vLLM-CPU's transposed K
 * (vllm_cpu_vec, dim stride = block size, token stride 1) included. The chunk side is
 * contiguous [entries, blocks, block_size, heads, width]. Elements move as raw 1, 2, 4 or 8-byte
 * words, so every dtype is copied bit-exactly.
 *
 * A transposed K is moved in 8 x 8 tiles: AVX2 shuffles for 4-byte words where the CPU has AVX2
 * (checked at run time), SSE2 for 2-byte words (every x86-64 CPU), a scalar 16 x 16 tile
 * otherwise. Rows with a contiguous dim are plain memcpy. With the SIMD loops, a scatter writes
 * aligned rows with non-temporal stores: the destination (vLLM's KV blocks) is far larger than
 * the caches and is not read again before the next forward pass, so skipping the read-for-
 * ownership of every line roughly doubles the copy's speed from a cold source (measured). A
 * gather copies rows of whole 16-byte words with inline SSE2 loads and stores: a libc memcpy
 * call per 256-byte row made vLLM-CPU's V gather about 3 times slower (20 ms against 6.5 ms for
 * 75 MB, measured in a bare process).
 */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define LMC_X86 1
#else
#define LMC_X86 0
#endif

/* Edge of the scalar tile: a tile's rows stay in L1 on both sides. */
#define TILE 16

static int use_avx2 = 0; /* 4-byte tiles: AVX2 (and streaming stores) */
static int use_sse2 = 0; /* 2-byte tiles and streamed rows: SSE2 */

/* Any [tokens, dims] of one head: kv strides (kt, kd), chunk strides (ct, 1). */
#define DEFINE_ANY(NAME, T)                                                                      \
    static void NAME(int scatter, T *k, T *c, int64_t tokens, int64_t dims, int64_t kt,          \
                     int64_t kd, int64_t ct)                                                     \
    {                                                                                            \
        for (int64_t t = 0; t < tokens; t++)                                                     \
            for (int64_t d = 0; d < dims; d++) {                                                 \
                if (scatter)                                                                     \
                    k[t * kt + d * kd] = c[t * ct + d];                                          \
                else                                                                             \
                    c[t * ct + d] = k[t * kt + d * kd];                                          \
            }                                                                                    \
    }

/* dst[j * ds + i] = src[i * ss + j] for an n x n tile (scalar, through an L1 buffer). */
#define DEFINE_TILE(NAME, T)                                                                     \
    static void NAME(const T *src, int64_t ss, T *dst, int64_t ds)                               \
    {                                                                                            \
        T tile[TILE][TILE];                                                                      \
        for (int i = 0; i < TILE; i++)                                                           \
            for (int j = 0; j < TILE; j++)                                                       \
                tile[j][i] = src[i * ss + j];                                                    \
        for (int j = 0; j < TILE; j++)                                                           \
            memcpy(dst + j * ds, tile[j], sizeof(tile[j]));                                      \
    }

DEFINE_ANY(any_u8, uint8_t)
DEFINE_ANY(any_u16, uint16_t)
DEFINE_ANY(any_u32, uint32_t)
DEFINE_ANY(any_u64, uint64_t)
DEFINE_TILE(tile_u8, uint8_t)
DEFINE_TILE(tile_u16, uint16_t)
DEFINE_TILE(tile_u32, uint32_t)
DEFINE_TILE(tile_u64, uint64_t)

#if LMC_X86
/* dst[j * ds + i] = src[i * ss + j], 8 x 8 words of 4 bytes. */
__attribute__((target("avx2"))) static void tr8_u32(const uint32_t *src, int64_t ss, uint32_t *dst, int64_t ds,
                                                    int nt)
{
    const float *s = (const float *)src;
    float *d = (float *)dst;
    __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ss), r2 = _mm256_loadu_ps(s + 2 * ss),
           r3 = _mm256_loadu_ps(s + 3 * ss), r4 = _mm256_loadu_ps(s + 4 * ss), r5 = _mm256_loadu_ps(s + 5 * ss),
           r6 = _mm256_loadu_ps(s + 6 * ss), r7 = _mm256_loadu_ps(s + 7 * ss);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
           t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
           t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
           u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
           u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
           u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    /* Shuffles move bits: no float arithmetic, so NaN payloads and every bit pattern survive. */
    __m256 o[8] = {
        _mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
        _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
        _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
        _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31),
    };
    if (nt)
        for (int i = 0; i < 8; i++)
            _mm256_stream_ps(d + i * ds, o[i]);
    else
        for (int i = 0; i < 8; i++)
            _mm256_storeu_ps(d + i * ds, o[i]);
}

/* dst[j * ds + i] = src[i * ss + j], 8 x 8 words of 2 bytes (SSE2). */
static void tr8_u16(const uint16_t *src, int64_t ss, uint16_t *dst, int64_t ds, int nt)
{
    __m128i r[8], a[8], b[8];
    for (int i = 0; i < 8; i++)
        r[i] = _mm_loadu_si128((const __m128i *)(src + i * ss));
    for (int i = 0; i < 4; i++) {
        a[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
    }
    b[0] = _mm_unpacklo_epi32(a[0], a[2]);
    b[1] = _mm_unpackhi_epi32(a[0], a[2]);
    b[2] = _mm_unpacklo_epi32(a[1], a[3]);
    b[3] = _mm_unpackhi_epi32(a[1], a[3]);
    b[4] = _mm_unpacklo_epi32(a[4], a[6]);
    b[5] = _mm_unpackhi_epi32(a[4], a[6]);
    b[6] = _mm_unpacklo_epi32(a[5], a[7]);
    b[7] = _mm_unpackhi_epi32(a[5], a[7]);
    for (int j = 0; j < 4; j++) {
        __m128i lo = _mm_unpacklo_epi64(b[j], b[j + 4]), hi = _mm_unpackhi_epi64(b[j], b[j + 4]);
        if (nt) {
            _mm_stream_si128((__m128i *)(dst + (2 * j) * ds), lo);
            _mm_stream_si128((__m128i *)(dst + (2 * j + 1) * ds), hi);
        } else {
            _mm_storeu_si128((__m128i *)(dst + (2 * j) * ds), lo);
            _mm_storeu_si128((__m128i *)(dst + (2 * j + 1) * ds), hi);
        }
    }
}

/* A row of n bytes, dst 16-byte aligned and n a multiple of 16: streaming stores. */
static void stream_row(void *dst, const void *src, size_t n)
{
    __m128i *d = (__m128i *)dst;
    const __m128i *s = (const __m128i *)src;
    for (size_t i = 0; i < n / 16; i++)
        _mm_stream_si128(d + i, _mm_loadu_si128(s + i));
}
#endif

/* A transposed head (kv: dims are rows of stride kd, tokens contiguous): tiles, then the edges. */
#define DEFINE_TRANSPOSED(NAME, T, ANY, TILE_FN, VEC_FN, VEC_ON)                                 \
    static void NAME(int scatter, T *k, T *c, int64_t tokens, int64_t dims, int64_t kd,          \
                     int64_t ct)                                                                 \
    {                                                                                            \
        const int vec = (VEC_ON);                                                                \
        /* Streaming stores need every tile row aligned to its 8 words. */                       \
        const uintptr_t align = 8 * sizeof(T) - 1;                                               \
        const int nt = vec && scatter && !(((uintptr_t)k | (uintptr_t)(kd * sizeof(T))) & align); \
        const int64_t e = vec ? 8 : TILE;                                                        \
        const int64_t tt = tokens - tokens % e, dd = dims - dims % e;                            \
        for (int64_t d0 = 0; d0 < dd; d0 += e)                                                   \
            for (int64_t t0 = 0; t0 < tt; t0 += e) {                                             \
                T *kp = k + d0 * kd + t0;                                                        \
                T *cp = c + t0 * ct + d0;                                                        \
                if (vec) {                                                                       \
                    if (scatter)                                                                 \
                        VEC_FN(cp, ct, kp, kd, nt);                                              \
                    else                                                                         \
                        VEC_FN(kp, kd, cp, ct, 0);                                               \
                } else if (scatter) {                                                            \
                    TILE_FN(cp, ct, kp, kd);                                                     \
                } else {                                                                         \
                    TILE_FN(kp, kd, cp, ct);                                                     \
                }                                                                                \
            }                                                                                    \
        if (tt < tokens) /* the last tokens, every dim */                                        \
            ANY(scatter, k + tt, c + tt * ct, tokens - tt, dims, 1, kd, ct);                     \
        if (dd < dims) /* the last dims of the tiled tokens */                                   \
            ANY(scatter, k + dd * kd, c + dd, tt, dims - dd, 1, kd, ct);                         \
    }

#if LMC_X86
DEFINE_TRANSPOSED(tr_head_u16, uint16_t, any_u16, tile_u16, tr8_u16, use_sse2)
DEFINE_TRANSPOSED(tr_head_u32, uint32_t, any_u32, tile_u32, tr8_u32, use_avx2)
#else
static void no_vec_u16(const uint16_t *s, int64_t ss, uint16_t *d, int64_t ds, int nt) {}
static void no_vec_u32(const uint32_t *s, int64_t ss, uint32_t *d, int64_t ds, int nt) {}
DEFINE_TRANSPOSED(tr_head_u16, uint16_t, any_u16, tile_u16, no_vec_u16, 0)
DEFINE_TRANSPOSED(tr_head_u32, uint32_t, any_u32, tile_u32, no_vec_u32, 0)
#endif
static void no_vec_u8(const uint8_t *s, int64_t ss, uint8_t *d, int64_t ds, int nt) {}
static void no_vec_u64(const uint64_t *s, int64_t ss, uint64_t *d, int64_t ds, int nt) {}
DEFINE_TRANSPOSED(tr_head_u8, uint8_t, any_u8, tile_u8, no_vec_u8, 0)
DEFINE_TRANSPOSED(tr_head_u64, uint64_t, any_u64, tile_u64, no_vec_u64, 0)

/* Whether rows of `row` bytes at kv + multiples of the strides (bytes) may be streamed. */
static int stream_ok(const void *kv, size_t row, int64_t st, int64_t sh)
{
    return use_sse2 && !(((uintptr_t)kv | row | (uintptr_t)st | (uintptr_t)sh) & 15);
}

#if LMC_X86
#define STREAM_ROW stream_row
/* A row of n bytes (a multiple of 16), any alignment, ordinary stores: no libc call per row. */
static inline void load_row(void *dst, const void *src, size_t n)
{
    __m128i *d = (__m128i *)dst;
    const __m128i *s = (const __m128i *)src;
    for (size_t i = 0; i < n / 16; i++)
        _mm_storeu_si128(d + i, _mm_loadu_si128(s + i));
}
#define LOAD_ROW load_row
#else
#define STREAM_ROW memcpy
#define LOAD_ROW memcpy
#endif

/* One block of one entry: [bs, heads, width] with kv strides (st, sh, sd), chunk contiguous. */
#define DEFINE_BLOCK_COPY(NAME, T, ANY, TRANSPOSED)                                              \
    static void NAME(int scatter, char *kv_block, char *chunk, int64_t bs, int64_t heads,        \
                     int64_t width, int64_t st, int64_t sh, int64_t sd)                          \
    {                                                                                            \
        T *kv = (T *)kv_block;                                                                   \
        T *ch = (T *)chunk;                                                                      \
        const int64_t ct = heads * width; /* chunk stride of one token */                        \
        if (sd == 1) { /* rows of width elements on both sides */                                \
            const size_t row = (size_t)width * sizeof(T);                                        \
            const int nt = scatter && stream_ok(kv, row, st * sizeof(T), sh * sizeof(T));        \
            if (!scatter && use_sse2 && !(row & 15)) { /* rows of whole 16-byte words, inline */ \
                for (int64_t t = 0; t < bs; t++)                                                 \
                    for (int64_t h = 0; h < heads; h++)                                          \
                        LOAD_ROW(ch + t * ct + h * width, kv + t * st + h * sh, row);            \
                return;                                                                          \
            }                                                                                    \
            for (int64_t t = 0; t < bs; t++)                                                     \
                for (int64_t h = 0; h < heads; h++) {                                            \
                    T *k = kv + t * st + h * sh;                                                 \
                    T *c = ch + t * ct + h * width;                                              \
                    if (nt)                                                                      \
                        STREAM_ROW(k, c, row);                                                   \
                    else if (scatter)                                                            \
                        memcpy(k, c, row);                                                       \
                    else                                                                         \
                        memcpy(c, k, row);                                                       \
                }                                                                                \
            return;                                                                              \
        }                                                                                        \
        for (int64_t h = 0; h < heads; h++) {                                                    \
            if (st == 1) /* transposed (vllm_cpu_vec's K): [width, bs] per head */               \
                TRANSPOSED(scatter, kv + h * sh, ch + h * width, bs, width, sd, ct);             \
            else /* any other strides */                                                         \
                ANY(scatter, kv + h * sh, ch + h * width, bs, width, st, sd, ct);                \
        }                                                                                        \
    }

DEFINE_BLOCK_COPY(copy_u8, uint8_t, any_u8, tr_head_u8)
DEFINE_BLOCK_COPY(copy_u16, uint16_t, any_u16, tr_head_u16)
DEFINE_BLOCK_COPY(copy_u32, uint32_t, any_u32, tr_head_u32)
DEFINE_BLOCK_COPY(copy_u64, uint64_t, any_u64, tr_head_u64)

/* Whether the SIMD tiles and streaming stores are used (AVX2 where the CPU has it, SSE2 on every
 * x86-64 CPU); tests turn them off to check the scalar loops. Returns whether AVX2 is used. */
int lmc_block_copy_simd(int want)
{
#if LMC_X86
    __builtin_cpu_init();
    use_avx2 = want && __builtin_cpu_supports("avx2");
    use_sse2 = want;
#else
    (void)want;
#endif
    return use_avx2;
}

/* One block's copy for elements of esize bytes; NULL for a size other than 1, 2, 4 or 8. */
typedef void (*block_copy_fn)(int, char *, char *, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);

static block_copy_fn copy_for(int64_t esize)
{
    switch (esize) {
    case 1: return copy_u8;
    case 2: return copy_u16;
    case 4: return copy_u32;
    case 8: return copy_u64;
    default: return NULL;
    }
}

/*
 * scatter: 1 copies chunk -> KV blocks, 0 copies KV blocks -> chunk.
 * strides: n_entries x 4 element strides (block, token, head, dim).
 * Returns 0, or -1 for an element size other than 1, 2, 4 or 8.
 */
int lmc_block_copy(int scatter, int64_t n_entries, const int64_t *entry_addrs, const int64_t *strides,
                   int64_t n_blocks, const int64_t *block_ids, char *chunk, int64_t bs, int64_t heads,
                   int64_t width, int64_t esize)
{
    const block_copy_fn copy = copy_for(esize);
    if (copy == NULL)
        return -1;
    const int64_t part = bs * heads * width * esize; /* bytes of one block in the chunk */
    for (int64_t e = 0; e < n_entries; e++) {
        const int64_t *s = strides + 4 * e;
        char *base = (char *)(intptr_t)entry_addrs[e];
        for (int64_t b = 0; b < n_blocks; b++) {
            char *kv_block = base + block_ids[b] * s[0] * esize;
            char *c = chunk + (e * n_blocks + b) * part;
            copy(scatter, kv_block, c, bs, heads, width, s[1], s[2], s[3]);
        }
    }
#if LMC_X86
    if (scatter && use_sse2)
        _mm_sfence(); /* streamed stores are visible to other threads before this returns */
#endif
    return 0;
}

/*
 * The hashed copies of a PD transfer (lmcache.integrations.vllm.pd): the same block copy as
 * lmc_block_copy, with the chunk's checksum taken in the same pass, so a 150 MB transfer is
 * read from memory once on each side instead of twice. `update` is a streaming hash's update
 * function (xxh3-64's XXH3_64bits_update, looked up by the caller) called on the chunk's bytes
 * in order, one block part at a time, while that part is in cache; it returns 0 on success.
 *
 * Gather (scatter 0): each block part is copied into `bounce` (a caller-owned buffer of one
 * part, which stays in L2), hashed there, then streamed into the chunk with non-temporal stores
 * where the chunk is 16-byte aligned (the chunk is a reserved block of the cache server's pool,
 * far larger than the caches and read by another process: streaming skips the read-for-
 * ownership of every line, as the scatter does for vLLM's blocks). Without `bounce`, or
 * unaligned, the part is copied straight into the chunk and hashed there.
 *
 * Scatter (scatter 1): each block part of the chunk is hashed, then copied from cache into the
 * KV blocks (streaming stores as in lmc_block_copy). The caller compares the hash with the
 * value's stored checksum after the call: a mismatch means the blocks hold a corrupt value,
 * which the caller reports as not loaded (vLLM recomputes those blocks).
 *
 * Returns 0, -1 for an element size other than 1, 2, 4 or 8, -2 when `update` failed.
 */
typedef int (*lmc_hash_update)(void *state, const void *data, size_t len);

int lmc_block_copy_hashed(int scatter, int64_t n_entries, const int64_t *entry_addrs, const int64_t *strides,
                          int64_t n_blocks, const int64_t *block_ids, char *chunk, int64_t bs, int64_t heads,
                          int64_t width, int64_t esize, char *bounce, lmc_hash_update update, void *state)
{
    const block_copy_fn copy = copy_for(esize);
    if (copy == NULL)
        return -1;
    const int64_t part = bs * heads * width * esize;
    const int stream = bounce != NULL && use_sse2 && !(((uintptr_t)chunk | (uintptr_t)part) & 15);
    for (int64_t e = 0; e < n_entries; e++) {
        const int64_t *s = strides + 4 * e;
        char *base = (char *)(intptr_t)entry_addrs[e];
        for (int64_t b = 0; b < n_blocks; b++) {
            char *kv_block = base + block_ids[b] * s[0] * esize;
            char *c = chunk + (e * n_blocks + b) * part;
            if (scatter) {
                if (update(state, c, (size_t)part) != 0)
                    return -2;
                copy(1, kv_block, c, bs, heads, width, s[1], s[2], s[3]);
            } else if (stream) {
                copy(0, kv_block, bounce, bs, heads, width, s[1], s[2], s[3]);
                if (update(state, bounce, (size_t)part) != 0)
                    return -2;
#if LMC_X86
                stream_row(c, bounce, (size_t)part);
#else
                memcpy(c, bounce, (size_t)part);
#endif
            } else {
                copy(0, kv_block, c, bs, heads, width, s[1], s[2], s[3]);
                if (update(state, c, (size_t)part) != 0)
                    return -2;
            }
        }
    }
#if LMC_X86
    if (use_sse2)
        _mm_sfence(); /* streamed stores are visible to other threads (and processes) first */
#endif
    return 0;
}
