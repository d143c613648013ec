// Direct sparse convolution kernel core (see conv.h), written once and compiled per ISA
// like kernels.inl: the including file sets the target, ST_ISA, ST_ISA_NAME,
// ST_VECTOR_BYTES and ST_HAS_FMA. Torch-free; internal linkage except make_conv_table().

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "conv.h"

#if ST_VECTOR_BYTES >= 32
#include <immintrin.h>
#endif

namespace sparseticket {
namespace cpu {
namespace ST_ISA {
namespace {

template <typename T>
struct CVec;
template <>
struct CVec<float> {
  typedef float type __attribute__((vector_size(ST_VECTOR_BYTES), aligned(4)));
  static constexpr int L = ST_VECTOR_BYTES / 4;
};
template <>
struct CVec<double> {
  typedef double type __attribute__((vector_size(ST_VECTOR_BYTES), aligned(8)));
  static constexpr int L = ST_VECTOR_BYTES / 8;
};

// Unaligned vector load/store. Explicit intrinsics on x86: GCC expands a 32-byte
// __builtin_memcpy under the AVX2 target into two 16-byte moves through the stack, and
// the 32-byte reload then misses store forwarding (the AVX2 build ran ~20x slower).
template <typename T>
inline typename CVec<T>::type cload(const T* p) {
  using V = typename CVec<T>::type;
#if ST_VECTOR_BYTES == 64
  if constexpr (sizeof(T) == 4)
    return reinterpret_cast<V>(_mm512_loadu_ps(p));
  else
    return reinterpret_cast<V>(_mm512_loadu_pd(p));
#elif ST_VECTOR_BYTES == 32
  if constexpr (sizeof(T) == 4)
    return reinterpret_cast<V>(_mm256_loadu_ps(reinterpret_cast<const float*>(p)));
  else
    return reinterpret_cast<V>(_mm256_loadu_pd(reinterpret_cast<const double*>(p)));
#else
  V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
#endif
}

template <typename T>
inline void cstore(T* p, typename CVec<T>::type v) {
#if ST_VECTOR_BYTES == 64
  if constexpr (sizeof(T) == 4)
    _mm512_storeu_ps(p, reinterpret_cast<__m512>(v));
  else
    _mm512_storeu_pd(p, reinterpret_cast<__m512d>(v));
#elif ST_VECTOR_BYTES == 32
  if constexpr (sizeof(T) == 4)
    _mm256_storeu_ps(reinterpret_cast<float*>(p), reinterpret_cast<__m256>(v));
  else
    _mm256_storeu_pd(reinterpret_cast<double*>(p), reinterpret_cast<__m256d>(v));
#else
  __builtin_memcpy(p, &v, sizeof(v));
#endif
}

template <typename T>
inline T csum(typename CVec<T>::type v) {
#if ST_VECTOR_BYTES == 64
  if constexpr (sizeof(T) == 4)
    return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
  else
    return _mm512_reduce_add_pd(reinterpret_cast<__m512d>(v));
#else
  constexpr int L = CVec<T>::L;
  T lanes[L];
  __builtin_memcpy(lanes, &v, sizeof(v));
#pragma GCC unroll 16
  for (int w = L / 2; w >= 1; w /= 2)
#pragma GCC unroll 16
    for (int i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  return lanes[0];
#endif
}

// out[k] += horizontal sum of c[k], k < 4. For 16 floats: interleave-and-add until each
// 128-bit lane holds the four partial sums, then fold the lanes (11 instructions for
// four sums; the generic tree spilled each vector and did 15 scalar adds).
template <typename T>
inline void csum4_add(const typename CVec<T>::type* c, T* out) {
#if ST_VECTOR_BYTES == 64
  if constexpr (sizeof(T) == 4) {
    const __m512 a0 = reinterpret_cast<__m512>(c[0]), a1 = reinterpret_cast<__m512>(c[1]);
    const __m512 a2 = reinterpret_cast<__m512>(c[2]), a3 = reinterpret_cast<__m512>(c[3]);
    const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, 0x44), _mm512_shuffle_ps(t01, t23, 0xEE));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(out, _mm_add_ps(_mm_loadu_ps(out), q));
    return;
  }
#elif ST_VECTOR_BYTES == 32
  if constexpr (sizeof(T) == 4) {
    // two rounds of pairwise horizontal adds leave [s0, s1, s2, s3] in each 128-bit half
    const __m256 a0 = reinterpret_cast<__m256>(c[0]), a1 = reinterpret_cast<__m256>(c[1]);
    const __m256 a2 = reinterpret_cast<__m256>(c[2]), a3 = reinterpret_cast<__m256>(c[3]);
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    _mm_storeu_ps(out, _mm_add_ps(_mm_loadu_ps(out), q));
    return;
  }
#endif
  for (int k = 0; k < 4; ++k) out[k] += csum<T>(c[k]);
}

// The first n lanes of v to p (0 < n < L): a masked store where the ISA has one, so the
// ragged last vector of a row costs one instruction instead of a spill and a copy.
template <typename T>
inline void cstore_n(T* p, typename CVec<T>::type v, int64_t n) {
#if ST_VECTOR_BYTES == 64
  const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
  if constexpr (sizeof(T) == 4)
    _mm512_mask_storeu_ps(p, m, reinterpret_cast<__m512>(v));
  else
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>(m), reinterpret_cast<__m512d>(v));
#elif ST_VECTOR_BYTES == 32
  if constexpr (sizeof(T) == 4) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps(reinterpret_cast<float*>(p), _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx),
                        reinterpret_cast<__m256>(v));
  } else {
    const __m256i idx = _mm256_setr_epi64x(0, 1, 2, 3);
    _mm256_maskstore_pd(reinterpret_cast<double*>(p), _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), idx),
                        reinterpret_cast<__m256d>(v));
  }
#else
  T lanes[CVec<T>::L];
  __builtin_memcpy(lanes, &v, sizeof(v));
  for (int64_t i = 0; i < n; ++i) p[i] = lanes[i];
#endif
}

// Half a vector: the last vector of a row tile whose width is an odd number of half
// vectors (AVX2 float: 28 = 3 x 8 + 4 columns, Conv-4's 28x28 planes). On the Zen 1 a
// 256-bit load or FMA is two 128-bit operations, so a 4-lane tail costs half of an 8-lane
// one (a list entry of correlate's 3-row tile: 6.0 ns with 3 + 1/2 vectors per row, 6.7
// with 4, in a stand-alone loop).
template <typename T>
struct CHalf {
  typedef T type __attribute__((vector_size(ST_VECTOR_BYTES / 2), aligned(sizeof(T))));
};

template <typename T>
inline typename CHalf<T>::type hload(const T* p) {
  using H = typename CHalf<T>::type;
#if ST_VECTOR_BYTES == 32
  if constexpr (sizeof(T) == 4) return reinterpret_cast<H>(_mm_loadu_ps(reinterpret_cast<const float*>(p)));
#endif
  H v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void hstore(T* p, typename CHalf<T>::type v) {
#if ST_VECTOR_BYTES == 32
  if constexpr (sizeof(T) == 4) {
    _mm_storeu_ps(reinterpret_cast<float*>(p), reinterpret_cast<__m128>(v));
    return;
  }
#endif
  __builtin_memcpy(p, &v, sizeof(v));
}

// 32 vector registers with AVX-512, 16 otherwise; a few stay free for the broadcast
// weight and addresses.
constexpr int kAccBudget = ST_VECTOR_BYTES == 64 ? 28 : 14;

// ----------------------------------------------------------------------------- packing

// Lanes [lo, hi) of the vector at p (0 <= lo <= hi <= L), zeros elsewhere; the other
// lanes' addresses are never read (masked loads suppress their faults).
template <typename T>
inline typename CVec<T>::type cload_range(const T* p, int64_t lo, int64_t hi) {
  using V = typename CVec<T>::type;
#if ST_VECTOR_BYTES == 64
  const unsigned m = hi > lo ? ((1u << hi) - 1u) & ~((1u << lo) - 1u) : 0u;
  if constexpr (sizeof(T) == 4)
    return reinterpret_cast<V>(_mm512_maskz_loadu_ps(static_cast<__mmask16>(m), p));
  else
    return reinterpret_cast<V>(_mm512_maskz_loadu_pd(static_cast<__mmask8>(m), p));
#elif ST_VECTOR_BYTES == 32
  if constexpr (sizeof(T) == 4) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lo)), idx),
                                          _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(hi)), idx));
    return reinterpret_cast<V>(_mm256_maskload_ps(reinterpret_cast<const float*>(p), m));
  } else {
    const __m256i idx = _mm256_setr_epi64x(0, 1, 2, 3);
    const __m256i m = _mm256_andnot_si256(_mm256_cmpgt_epi64(_mm256_set1_epi64x(lo), idx),
                                          _mm256_cmpgt_epi64(_mm256_set1_epi64x(hi), idx));
    return reinterpret_cast<V>(_mm256_maskload_pd(reinterpret_cast<const double*>(p), m));
  }
#else
  T lanes[CVec<T>::L] = {};
  for (int64_t k = lo; k < hi; ++k) lanes[k] = p[k];
  V v;
  __builtin_memcpy(&v, lanes, sizeof(v));
  return v;
#endif
}

// The first n lanes of the vector at p (n >= 0; all of it when n >= L), zeros elsewhere,
// and its store: a whole vector, a masked one, or nothing.
template <typename T>
inline typename CVec<T>::type cload_first(const T* p, int64_t n) {
  return n >= CVec<T>::L ? cload(p) : cload_range(p, 0, n > 0 ? n : 0);
}

template <typename T>
inline void cstore_first(T* p, typename CVec<T>::type v, int64_t n) {
  if (n >= CVec<T>::L)
    cstore(p, v);
  else if (n > 0)
    cstore_n(p, v, n);
}

// dst row d[q] = s[q - left] for q - left in [0, W), else 0: one masked load and one store
// per vector. (Three memset/memcpy calls per row cost ~27 us per 64x28x28 image, about as
// much as reading it from memory.)
template <typename T>
inline void pack_row(const T* __restrict s, int64_t W, int64_t left, int64_t cols, T* __restrict d) {
  constexpr int L = CVec<T>::L;
  const int64_t q_lo = left < cols ? left : cols, q_hi = left + W < cols ? left + W : cols;
  for (int64_t q0 = 0; q0 < cols; q0 += L) {
    const int64_t lo = q_lo - q0 > 0 ? q_lo - q0 : 0, hi = q_hi - q0 < L ? q_hi - q0 : L;
    const typename CVec<T>::type v =
        hi <= lo ? typename CVec<T>::type{} : hi - lo == L ? cload(s + (q0 - left)) : cload_range(s + (q0 - left), lo, hi);
    cstore_first(d + q0, v, cols - q0);
  }
}

#if ST_VECTOR_BYTES == 32
// pack_planes' stride-1 case with AVX2. Its masked loads (vmaskmovps) and stores cost ~13
// cycles each on the Zen 1, and a 28-wide row padded to 34 needed two of each: packing a
// 64x28x28 image ran at ~4 GB/s, half of a forward at density 0.0 and ~13% of one at 0.1.
// Here every vector is a plain load ANDed with its lanes' mask (the lanes outside the row
// read the neighbouring rows, which are in src) and a plain store, whose lanes past the
// row's end land in the next row and are overwritten when it is written (rows go in
// order). Only loads that would leave src (the image's first and last rows) and stores
// that would leave dst (its last row) are masked.
template <typename T>
void pack_planes_rows(const T* __restrict src, int64_t C, int64_t H, int64_t W, int64_t top, int64_t left,
                      int64_t rows, int64_t cols, T* __restrict dst) {
  using V = typename CVec<T>::type;
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I IV __attribute__((vector_size(ST_VECTOR_BYTES)));
  constexpr int L = CVec<T>::L;
  const int64_t nvec = (cols + L - 1) / L;
  const int64_t q_lo = left < cols ? left : cols, q_hi = left + W < cols ? left + W : cols;
  constexpr int kMaxVec = 64;  // rows up to 512 floats here; wider ones take the generic path
  IV mask[kMaxVec];
  int8_t lo_of[kMaxVec], hi_of[kMaxVec];
  for (int64_t k = 0; k < nvec; ++k) {
    const int64_t q0 = k * L;
    const int64_t lo = q_lo - q0 > 0 ? q_lo - q0 : 0, hi = q_hi - q0 < L ? q_hi - q0 : L;
    lo_of[k] = static_cast<int8_t>(lo < L ? lo : L);
    hi_of[k] = static_cast<int8_t>(hi > 0 ? hi : 0);
    for (int i = 0; i < L; ++i) mask[k][i] = i >= lo && i < hi ? I(-1) : I(0);
  }
  // bounds as element offsets (a pointer before src would be undefined behaviour)
  const int64_t src_n = C * H * W, dst_n = C * rows * cols;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at_d = (c * rows + r) * cols;
      T* d = dst + at_d;  // not __restrict: a whole store overlaps the next row
      const int64_t h = r - top;
      const bool in = h >= 0 && h < H;
      const int64_t at_s = (c * H + h) * W;
      for (int64_t k = 0; k < nvec; ++k) {
        const int64_t q0 = k * L, lo = lo_of[k], hi = hi_of[k];
        V v{};
        if (in && hi > lo) {
          const int64_t at = at_s + (q0 - left);
          if (at >= 0 && at + L <= src_n)
            v = reinterpret_cast<V>(reinterpret_cast<IV>(cload(src + at)) & mask[k]);
          else  // lanes [lo, hi) only: their addresses are inside the row
            v = cload_range(src + at_s - left + q0, lo, hi);
        }
        if (at_d + q0 + L <= dst_n)
          cstore(d + q0, v);
        else
          cstore_first(d + q0, v, cols - q0);
      }
    }
}
#endif

#if ST_VECTOR_BYTES == 32
// The vector at p with lanes outside [lo, hi) zeroed, as one whole load and an AND (the
// caller guarantees the whole vector is readable): AVX2's masked load is slow on some CPUs
// (see pack_planes_rows). pack_planes_rows itself keeps a table of its columns' masks.
template <typename T>
inline typename CVec<T>::type cload_and(const T* p, int64_t lo, int64_t hi) {
  using V = typename CVec<T>::type;
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I IV __attribute__((vector_size(ST_VECTOR_BYTES)));
  IV iota;
  for (int i = 0; i < CVec<T>::L; ++i) iota[i] = i;
  return reinterpret_cast<V>(reinterpret_cast<IV>(cload(p)) & ((iota >= static_cast<I>(lo)) & (iota < static_cast<I>(hi))));
}
#endif

// pack_row for a row at element `at` of a readable range of `n` elements: with AVX2, a
// vector whose whole load stays in that range is cload_and instead of a masked load.
template <typename T>
inline void pack_row_in(const T* s, int64_t W, int64_t left, int64_t cols, T* __restrict d, int64_t at, int64_t n) {
#if ST_VECTOR_BYTES == 32
  constexpr int L = CVec<T>::L;
  const int64_t q_lo = left < cols ? left : cols, q_hi = left + W < cols ? left + W : cols;
  for (int64_t q0 = 0; q0 < cols; q0 += L) {
    const int64_t lo = q_lo - q0 > 0 ? q_lo - q0 : 0, hi = q_hi - q0 < L ? q_hi - q0 : L;
    const int64_t k = q0 - left;  // the vector's first lane, relative to s
    typename CVec<T>::type v{};
    if (hi - lo == L)
      v = cload(s + k);
    else if (hi > lo && at + k >= 0 && at + k + L <= n)
      v = cload_and(s + k, lo, hi);
    else if (hi > lo)
      v = cload_range(s - left + q0, lo, hi);
    cstore_first(d + q0, v, cols - q0);
  }
#else
  (void)at;
  (void)n;
  pack_row<T>(s, W, left, cols, d);
#endif
}

template <typename T>
void pack_planes(const void* srcv, int64_t C, int64_t H, int64_t W, int64_t top, int64_t left, int64_t step,
                 int64_t rows, int64_t cols, void* dstv) {
  const T* __restrict src = static_cast<const T*>(srcv);
  T* __restrict dst = static_cast<T*>(dstv);
#if ST_VECTOR_BYTES == 32
  if (step == 1 && cols <= 64 * CVec<T>::L) return pack_planes_rows<T>(src, C, H, W, top, left, rows, cols, dst);
#endif
  if (step == 1) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t r = 0; r < rows; ++r) {
        T* __restrict d = dst + (c * rows + r) * cols;
        const int64_t h = r - top;
        if (h < 0 || h >= H)
          std::memset(d, 0, sizeof(T) * cols);
        else
          pack_row<T>(src + (c * H + h) * W, W, left, cols, d);
      }
    return;
  }
  // Column phases: each padded row is built once (vector copy, zeros outside), then split
  // into its `step` phases by branch-free strided copies. (A per-element gather with bounds
  // checks made stride-2 convs ~2.5x slower per FLOP than stride 1.)
  const int64_t wide = cols * step;
  T* __restrict row = static_cast<T*>(__builtin_malloc(sizeof(T) * wide));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = r - top;
      if (h < 0 || h >= H) {
        for (int64_t b = 0; b < step; ++b) std::memset(dst + ((c * step + b) * rows + r) * cols, 0, sizeof(T) * cols);
        continue;
      }
      pack_row<T>(src + (c * H + h) * W, W, left, wide, row);
      for (int64_t b = 0; b < step; ++b) {
        T* __restrict d = dst + ((c * step + b) * rows + r) * cols;
        for (int64_t q = 0; q < cols; ++q) d[q] = row[q * step + b];
      }
    }
  __builtin_free(row);
}

// ----------------------------------------------------------------------------- correlate
//
// Output-stationary: a tile of R rows x NV vectors of one output plane lives in
// registers while the plane's list streams past. A list is four runs of row groups
// (conv.h): a group of K entries whose inputs are D rows apart loads each of its input
// rows once and feeds it to the K accumulator rows it touches, so a triple (a full column
// of 3x3 taps) does 3R FMAs per vector for R + 2 loads instead of 3R. With one load per
// FMA, loads were a limit (this Zen 4 does one 64-byte load and one 16-lane FMA per
// cycle, and a load that is not 32-byte aligned costs more).

// Keeps v in a register: without it GCC folds the load back into every FMA that uses it
// as a memory operand, which undoes the sharing below (3 loads per triple row again).
template <typename V>
inline void pin_register(V& v) {
#if ST_VECTOR_BYTES >= 32
  __asm__("" : "+v"(v));
#else
  (void)v;
#endif
}

// NV vectors per row; with HALF the last of them is a half vector, in hacc (see CHalf).
template <typename T, int NV, int R, bool HALF, int K, int D1, int D2>
inline void corr_run(typename CVec<T>::type (&acc)[R][NV], typename CHalf<T>::type (&hacc)[R],
                     const T* __restrict base, int64_t in_row, const int32_t* __restrict off,
                     const T* __restrict val, int64_t e0, int64_t e1) {
  using V = typename CVec<T>::type;
  using H = typename CHalf<T>::type;
  constexpr int L = CVec<T>::L;
  constexpr int NF = HALF ? NV - 1 : NV;  // whole vectors
  constexpr int D[3] = {0, D1, D2};
  constexpr int span = R + (K == 3 ? D2 : K == 2 ? D1 : 0);
  for (int64_t e = e0; e < e1; e += K) {
    T w[K];
#pragma GCC unroll 3
    for (int k = 0; k < K; ++k) w[k] = val[e + k];
    const T* __restrict p = base + off[e];
    if constexpr (K == 1) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
        for (int v = 0; v < NF; ++v) acc[r][v] += w[0] * cload(p + v * L);
        if constexpr (HALF) hacc[r] += w[0] * hload(p + NF * L);
        p += in_row;
      }
    } else {
#pragma GCC unroll 16
      for (int rho = 0; rho < span; ++rho) {
#pragma GCC unroll 4
        for (int v = 0; v < NF; ++v) {
          V x = cload(p + v * L);
          pin_register(x);
#pragma GCC unroll 3
          for (int k = 0; k < K; ++k)
            if (rho - D[k] >= 0 && rho - D[k] < R) acc[rho - D[k]][v] += w[k] * x;
        }
        if constexpr (HALF) {
          H x = hload(p + NF * L);
          pin_register(x);
#pragma GCC unroll 3
          for (int k = 0; k < K; ++k)
            if (rho - D[k] >= 0 && rho - D[k] < R) hacc[rho - D[k]] += w[k] * x;
        }
        p += in_row;
      }
    }
  }
}

// HALF: the last of a row's NV vectors is a half vector, and the call's planes are exactly
// NV - 1/2 vectors wide in one column tile (a.cols == (NV - 1) * L + L / 2, a.col_tiles
// == 1), so every store is whole. Scratch keeps a whole vector's slot for it.
template <typename T, int NV, int R, bool HALF>
void correlate(const CorrArgs& a, int64_t l0, int64_t l1) {
  using V = typename CVec<T>::type;
  using H = typename CHalf<T>::type;
  constexpr int L = CVec<T>::L;
  constexpr int TW = NV * L;
  constexpr int NF = HALF ? NV - 1 : NV;  // whole vectors
  const T* __restrict in = static_cast<const T*>(a.in);
  const int32_t* __restrict ptr = a.ptr;
  const int32_t* __restrict off = a.off;
  const T* __restrict val = static_cast<const T*>(a.val);
  const T* __restrict bias = static_cast<const T*>(a.bias);
  T* __restrict out = static_cast<T*>(a.out);
  T* __restrict scratch = static_cast<T*>(a.scratch);
  const int64_t in_row = a.in_row, blocks = a.blocks;
  const bool relu = a.relu;
  // The ragged last vector of an output row is stored whole when the lanes past the row's
  // end fall on later rows of the same plane and band, which this call writes afterwards
  // (rows in order, one column tile): a masked store (vmaskmovps) costs ~13 cycles on the
  // Zen 1. Not near a band's end, whose next rows may be another thread's.
  const bool spill_rows = ST_VECTOR_BYTES == 32 && a.col_tiles == 1 && a.ldo == a.cols;

  // Tile by tile, so that a block's working set is its channels' R + 2 rows of one tile.
  for (int64_t r0 = 0; r0 < a.rows; r0 += R) {
    for (int64_t ct = 0; ct < a.col_tiles; ++ct) {
      const T* __restrict base = in + r0 * in_row + ct * TW;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const bool first = blk == 0, last = blk == blocks - 1;
        for (int64_t l = l0; l < l1; ++l) {
          const int32_t* __restrict run = ptr + (l * blocks + blk) * kRunKinds;
          if (!first && !last && run[0] == run[kRunKinds]) continue;  // nothing to add
          T* __restrict st = scratch + (l - l0) * (R * TW);
          V acc[R][NV];
          H hacc[R];
          const T b = bias ? bias[l] : T(0);
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
            for (int v = 0; v < NF; ++v) acc[r][v] = first ? V{} + b : cload(st + r * TW + v * L);
            if constexpr (HALF) hacc[r] = first ? H{} + b : hload(st + r * TW + NF * L);
          }
          corr_run<T, NV, R, HALF, 3, 1, 2>(acc, hacc, base, in_row, off, val, run[0], run[1]);
          corr_run<T, NV, R, HALF, 2, 1, 0>(acc, hacc, base, in_row, off, val, run[1], run[2]);
          corr_run<T, NV, R, HALF, 2, 2, 0>(acc, hacc, base, in_row, off, val, run[2], run[3]);
          corr_run<T, NV, R, HALF, 1, 0, 0>(acc, hacc, base, in_row, off, val, run[3], run[4]);
          if (!last) {
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
              for (int v = 0; v < NF; ++v) cstore(st + r * TW + v * L, acc[r][v]);
              if constexpr (HALF) hstore(st + r * TW + NF * L, hacc[r]);
            }
            continue;
          }
          if (relu) {  // max(0, v) as the tile is written; 0 > NaN is false, so NaN stays
            const V zero{};
            const H hzero{};
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
              for (int v = 0; v < NF; ++v) acc[r][v] = zero > acc[r][v] ? zero : acc[r][v];
              if constexpr (HALF) hacc[r] = hzero > hacc[r] ? hzero : hacc[r];
            }
          }
          T* o = out + l * a.out_plane;
          const int64_t nr = a.rows - r0 < R ? a.rows - r0 : R;
          const int64_t c0 = ct * TW;
          const int64_t nc = a.cols - c0 < TW ? a.cols - c0 : TW;
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) {
            if (r >= nr) break;
            T* d = o + (r0 + r) * a.ldo + c0;  // not __restrict: a spilling store overlaps the next row
            const bool spill = spill_rows && (r0 + r) * a.cols + TW <= a.rows * a.cols;
#pragma GCC unroll 4
            for (int v = 0; v < NF; ++v) {
              if (spill && nc - v * L > 0)
                cstore(d + v * L, acc[r][v]);
              else
                cstore_first(d + v * L, acc[r][v], nc - v * L);
            }
            if constexpr (HALF) hstore(d + NF * L, hacc[r]);  // the row's last L / 2 columns
          }
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------- dots
//
// Kept-weight gradient of one image: out[e] += <gy plane of the entry's list, input
// shifted by off[e]>, read straight from gy (no copy): a masked load for a ragged row end.
// The lists come in correlate's runs (conv.h): G groups of K entries at row shifts
// (0, D1, D2) go together, so each input row vector is loaded once for its K products
// and each gy row vector once for the G groups (a triple block: 11 loads per 24 FMAs; one
// entry at a time needed 9 loads per 8).

// One input row vector per group (at xo) against the K gy vectors gk of the rows it meets.
template <typename T, int G, int K, int D1, int D2>
inline void dot_step(typename CVec<T>::type* acc, const T* __restrict const* xs, int64_t xo, const typename CVec<T>::type* gk,
                     int64_t rho, int64_t rows) {
  using V = typename CVec<T>::type;
  constexpr int D[3] = {0, D1, D2};
  bool all = true;
#pragma GCC unroll 3
  for (int k = 0; k < K; ++k) all = all && rho - D[k] >= 0 && rho - D[k] < rows;
  if (all) {
#pragma GCC unroll 8
    for (int i = 0; i < G; ++i) {
      V x = cload(xs[i] + xo);
      if constexpr (K > 1) pin_register(x);
#pragma GCC unroll 3
      for (int k = 0; k < K; ++k) acc[i * K + k] += gk[k] * x;
    }
  } else {  // first and last rows of a group: only some of its entries see this row
#pragma GCC unroll 8
    for (int i = 0; i < G; ++i) {
      V x = cload(xs[i] + xo);
      if constexpr (K > 1) pin_register(x);
#pragma GCC unroll 3
      for (int k = 0; k < K; ++k)
        if (rho - D[k] >= 0 && rho - D[k] < rows) acc[i * K + k] += gk[k] * x;
    }
  }
}

// Loads of the first n lanes of a vector (0 < n <= L; the rest zero: x's lanes there,
// padding, are ignored). The mask is built once per column vector: built per gy row (as a
// shift, a negation and a select in the loop over rows) it was ~5 more instructions for
// each gy vector shared by eight dot products.
template <typename T>
struct FirstLanes {
  using V = typename CVec<T>::type;
#if ST_VECTOR_BYTES == 64
  __mmask16 m;
  explicit FirstLanes(int64_t n) : m(static_cast<__mmask16>(n >= 16 ? 0xFFFFu : (1u << n) - 1u)) {}
  V load(const T* p) const {
    if constexpr (sizeof(T) == 4)
      return reinterpret_cast<V>(_mm512_maskz_loadu_ps(m, p));
    else
      return reinterpret_cast<V>(_mm512_maskz_loadu_pd(static_cast<__mmask8>(m), p));
  }
#else
  // AVX2: vmaskmovps is slow on some CPUs (the Zen 1), so where reading the whole vector
  // stays inside the plane (the extra lanes fall on the next rows) it is a plain load
  // ANDed with the lanes' mask (load_whole). The mask is rebuilt per load (a compare with a
  // constant): kept here it took a register from the accumulators, and the 28-wide weight
  // gradient at density 0.5 ran ~17% slower.
  int64_t n;
  explicit FirstLanes(int64_t n_) : n(n_) {}
  V load(const T* p) const { return cload_first(p, n); }
  V load_whole(const T* p) const { return cload_and(p, 0, n); }
#endif
};

// gy row r's vector at column q (lanes as `first`), or zero outside the plane
template <typename T>
inline typename CVec<T>::type gy_vec(const T* g, int64_t g_row, int64_t r, int64_t rows, int64_t q,
                                     const FirstLanes<T>& first) {
  if (r < 0 || r >= rows) return typename CVec<T>::type{};
  return first.load(g + r * g_row + q);
}

// The same for a row's ragged last vector (first.n < L; dot_groups calls it in a loop of
// its own): with AVX2 a whole load where it stays inside the plane. (Tested per load in
// the loop shared with whole vectors, it made dots 8-20% slower at 28x28: code
// generation, not the loads.)
template <typename T>
inline typename CVec<T>::type gy_tail(const T* g, int64_t g_row, int64_t r, int64_t rows, int64_t q,
                                      const FirstLanes<T>& first) {
#if ST_VECTOR_BYTES == 32
  if (r >= 0 && r < rows && r * g_row + q + CVec<T>::L <= rows * g_row) return first.load_whole(g + r * g_row + q);
#endif
  return gy_vec(g, g_row, r, rows, q, first);
}

template <typename T, int G, int K, int D1, int D2>
inline void dot_groups(const T* __restrict g, int64_t g_row, const T* __restrict X, const int32_t* __restrict off,
                       int64_t rows, int64_t cols, int64_t x_row, T* __restrict out) {
  using V = typename CVec<T>::type;
  constexpr int L = CVec<T>::L;
  constexpr int D[3] = {0, D1, D2};
  constexpr int DM = K == 3 ? D2 : K == 2 ? D1 : 0;
  V acc[G * K];
  const T* __restrict xs[G];
#pragma GCC unroll 24
  for (int i = 0; i < G * K; ++i) acc[i] = V{};
#pragma GCC unroll 8
  for (int i = 0; i < G; ++i) xs[i] = X + off[i * K];
  if (cols > L && cols <= 2 * L) {
    // Two vectors per row (28 wide): both in one pass over the rows, so the cache line a
    // row's two vectors share is read once (column vectors outer: density 0.1 10% slower).
    const FirstLanes<T> all(L), tail(cols - L);
    auto pass = [&](auto ragged) {  // ragged: the second vector is partial (gy_tail)
      for (int64_t rho = 0; rho < rows + DM; ++rho) {
        V g0[K], g1[K];
#pragma GCC unroll 3
        for (int k = 0; k < K; ++k) {
          g0[k] = gy_vec(g, g_row, rho - D[k], rows, 0, all);
          g1[k] = ragged ? gy_tail(g, g_row, rho - D[k], rows, L, tail) : gy_vec(g, g_row, rho - D[k], rows, L, tail);
        }
        dot_step<T, G, K, D1, D2>(acc, xs, rho * x_row, g0, rho, rows);
        dot_step<T, G, K, D1, D2>(acc, xs, rho * x_row + L, g1, rho, rows);
      }
    };
    if (cols < 2 * L)
      pass(std::true_type{});
    else
      pass(std::false_type{});
  } else {
    // Column vectors outer (rows outer with a runtime loop over a row's vectors inside was
    // 20-25% slower at 14x14, density 0.8).
    // Whole vectors, then a ragged last one (gy_tail), each its own loop.
    auto column = [&](int64_t q, const FirstLanes<T>& first, auto ragged) {
      for (int64_t rho = 0; rho < rows + DM; ++rho) {
        V gk[K];
#pragma GCC unroll 3
        for (int k = 0; k < K; ++k)
          gk[k] = ragged ? gy_tail(g, g_row, rho - D[k], rows, q, first) : gy_vec(g, g_row, rho - D[k], rows, q, first);
        dot_step<T, G, K, D1, D2>(acc, xs, rho * x_row + q, gk, rho, rows);
      }
    };
    const FirstLanes<T> all(L);
    int64_t q = 0;
    for (; q + L <= cols; q += L) column(q, all, std::false_type{});
    if (q < cols) column(q, FirstLanes<T>(cols - q), std::true_type{});
  }
  if constexpr ((G * K) % 4 == 0) {
#pragma GCC unroll 6
    for (int i = 0; i < G * K; i += 4) csum4_add<T>(acc + i, out + i);
  } else {
    for (int i = 0; i < G * K; ++i) out[i] += csum<T>(acc[i]);
  }
}

// Groups per pass: G * K accumulators, K (two-vector rows: 2K) gy vectors and an x vector
// must fit the registers. With AVX-512's 32 that is eight groups for every K; AVX2's 16
// hold four triples or pairs (eight triples spilled most of the accumulators).
template <int K>
constexpr int dot_max_groups() {
  return ST_VECTOR_BYTES == 64 || K == 1 ? 8 : 4;
}

// The groups of one run [e0, e1) (K entries each), eight groups at a time (where they fit
// the registers), then four, two, one.
template <typename T, int K, int D1, int D2>
inline void dot_run(const T* g, int64_t g_row, const T* X, const int32_t* off, int64_t rows, int64_t cols,
                    int64_t x_row, T* out, int64_t e0, int64_t e1) {
  constexpr int G = dot_max_groups<K>();
  int64_t e = e0;
  for (; e + G * K <= e1; e += G * K) dot_groups<T, G, K, D1, D2>(g, g_row, X, off + e, rows, cols, x_row, out + e);
  if (e + 4 * K <= e1) {  // (never taken when G = 4)
    dot_groups<T, 4, K, D1, D2>(g, g_row, X, off + e, rows, cols, x_row, out + e);
    e += 4 * K;
  }
  if (e + 2 * K <= e1) {
    dot_groups<T, 2, K, D1, D2>(g, g_row, X, off + e, rows, cols, x_row, out + e);
    e += 2 * K;
  }
  if (e + K <= e1) dot_groups<T, 1, K, D1, D2>(g, g_row, X, off + e, rows, cols, x_row, out + e);
}

template <typename T>
void dots(const DotArgs& a, int64_t l0, int64_t l1) {
  const T* __restrict X = static_cast<const T*>(a.x);
  const T* __restrict G = static_cast<const T*>(a.g);
  T* __restrict out = static_cast<T*>(a.out);
  for (int64_t l = l0; l < l1; ++l) {
    if (a.active && !a.active[l]) continue;
    const int32_t* run = a.ptr + l * kRunKinds;
    const T* __restrict g = G + l * a.g_plane;
    dot_run<T, 3, 1, 2>(g, a.g_row, X, a.off, a.rows, a.cols, a.x_row, out, run[0], run[1]);
    dot_run<T, 2, 1, 0>(g, a.g_row, X, a.off, a.rows, a.cols, a.x_row, out, run[1], run[2]);
    dot_run<T, 2, 2, 0>(g, a.g_row, X, a.off, a.rows, a.cols, a.x_row, out, run[2], run[3]);
    dot_run<T, 1, 0, 0>(g, a.g_row, X, a.off, a.rows, a.cols, a.x_row, out, run[3], run[4]);
  }
}

// The same dot products with the column shift moved from x to gy (DotArgs::shifts): the
// entry for tap (i, j) of list l is <gy_l shifted right by j * dw, x rows from off[e]>,
// which sums the same products, since x's column q + j*dw meets gy's column q either way.
// x is packed with rows a whole number of aligned vectors (ops_conv.cpp), and each
// sub-list's shifted copy of gy is built here, once per image, for all of that sub-list's
// entries, so no load splits a cache line (with x shifted, nearly every 64-byte load of x
// did).
template <typename T>
void dots_shifted(const DotArgs& a, int64_t l0, int64_t l1) {
  const T* __restrict X = static_cast<const T*>(a.x);
  const T* __restrict G = static_cast<const T*>(a.g);
  T* __restrict out = static_cast<T*>(a.out);
  T* __restrict gbuf = static_cast<T*>(a.gbuf);
  const int64_t S = a.shifts, rows = a.rows, cols = a.cols;
  for (int64_t l = l0; l < l1; ++l) {
    if (a.active && !a.active[l]) continue;
    const int32_t* lists = a.ptr + l * S * kRunKinds;
    if (lists[0] == lists[S * kRunKinds]) continue;  // no kept taps in this output channel
    const T* __restrict g = G + l * a.g_plane;
    for (int64_t j = 0; j < S; ++j) {
      const int32_t* run = lists + j * kRunKinds;
      if (run[0] == run[kRunKinds]) continue;
      T* __restrict gj = gbuf;  // (each copy is used up before the next is made)
      for (int64_t r = 0; r < rows; ++r)
        pack_row_in<T>(g + r * a.g_row, a.g_row, j * a.shift_step, cols, gj + r * cols, r * a.g_row, rows * a.g_row);
      dot_run<T, 3, 1, 2>(gj, cols, X, a.off, rows, cols, a.x_row, out, run[0], run[1]);
      dot_run<T, 2, 1, 0>(gj, cols, X, a.off, rows, cols, a.x_row, out, run[1], run[2]);
      dot_run<T, 2, 2, 0>(gj, cols, X, a.off, rows, cols, a.x_row, out, run[2], run[3]);
      dot_run<T, 1, 0, 0>(gj, cols, X, a.off, rows, cols, a.x_row, out, run[3], run[4]);
    }
  }
}

// ----------------------------------------------------------------------------- 2x2 max-pool
//
// (conv.h, Pool2Fn) Branch-free over vectors of L outputs: a row pair's 2L inputs are split
// into even and odd columns by two permutes, and each of the window's four elements is
// taken into the running max by compare and blend. (aten's NCHW kernel branches per
// element, and on real activations about half those branches mispredict: ~9 ms for a
// 64x64x28x28 batch, as long as the whole forward of a 90%-sparse conv at that size.)

// r[i] = (a, b)[m[i]] (lanes of a, then of b): GCC's two-vector __builtin_shuffle, which
// clang lacks (its __builtin_shufflevector takes constant indices only)
template <typename V, typename M>
inline V shuffle2(V a, V b, M m) {
#if defined(__clang__)
  constexpr int L = sizeof(V) / sizeof(a[0]);
  V r;
  for (int i = 0; i < L; ++i) r[i] = m[i] < L ? a[m[i]] : b[m[i] - L];
  return r;
#else
  return __builtin_shuffle(a, b, m);
#endif
}

template <typename T>
struct PoolVec {
  using V = typename CVec<T>::type;
  using M = decltype(V{} > V{});  // lane mask (signed integers of T's size)
  static constexpr int L = CVec<T>::L;
  static M iota(int mul, int add) {
    M m;
    for (int i = 0; i < L; ++i) m[i] = mul * i + add;
    return m;
  }
};

// where[0, n) <-> lanes [0, n) of a lane mask (0 < n <= L); the other lanes are left 0 /
// unwritten. With AVX-512 one masked widening load or narrowing store (a lane at a time,
// they cost more than the pooling itself on 8- and 14-wide planes).
template <typename T>
inline typename PoolVec<T>::M load_where(const uint8_t* w, int64_t n) {
  using M = typename PoolVec<T>::M;
#if ST_VECTOR_BYTES == 64
  const __m128i b = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << n) - 1u), w);
  if constexpr (sizeof(T) == 4)
    return reinterpret_cast<M>(_mm512_cvtepu8_epi32(b));
  else
    return reinterpret_cast<M>(_mm512_cvtepu8_epi64(b));
#else
  M k = M{};
  for (int64_t i = 0; i < n; ++i) k[i] = w[i];
  return k;
#endif
}

template <typename T>
inline void store_where(uint8_t* w, typename PoolVec<T>::M k, int64_t n) {
#if ST_VECTOR_BYTES == 64
  if constexpr (sizeof(T) == 4)
    _mm512_mask_cvtepi32_storeu_epi8(w, static_cast<__mmask16>((1u << n) - 1u), reinterpret_cast<__m512i>(k));
  else
    _mm512_mask_cvtepi64_storeu_epi8(w, static_cast<__mmask8>((1u << n) - 1u), reinterpret_cast<__m512i>(k));
#else
  for (int64_t i = 0; i < n; ++i) w[i] = static_cast<uint8_t>(k[i]);
#endif
}

template <typename T>
void pool2(const void* xv, int64_t planes, int64_t H, int64_t W, void* yv, uint8_t* where) {
  using P = PoolVec<T>;
  using V = typename P::V;
  using M = typename P::M;
  constexpr int L = P::L;
  const T* __restrict X = static_cast<const T*>(xv);
  T* __restrict Y = static_cast<T*>(yv);
  const int64_t OH = H / 2, OW = W / 2;
  const M even = P::iota(2, 0), odd = P::iota(2, 1);
  for (int64_t p = 0; p < planes; ++p) {
    for (int64_t r = 0; r < OH; ++r) {
      const T* __restrict r0 = X + (p * H + 2 * r) * W;
      const T* __restrict r1 = r0 + W;
      T* __restrict y = Y + (p * OH + r) * OW;
      uint8_t* __restrict w = where + (p * OH + r) * OW;
      for (int64_t q0 = 0; q0 < OW; q0 += L) {
        const int64_t n = OW - q0 < L ? OW - q0 : L, in = 2 * n;  // outputs, inputs per row
        const T* a = r0 + 2 * q0;
        const T* b = r1 + 2 * q0;
        const V a0 = cload_first(a, in), a1 = cload_first(a + L, in - L);
        const V b0 = cload_first(b, in), b1 = cload_first(b + L, in - L);
        V m = shuffle2(a0, a1, even);
        M k = M{};
        const V cand[3] = {shuffle2(a0, a1, odd), shuffle2(b0, b1, even), shuffle2(b0, b1, odd)};
#pragma GCC unroll 3
        for (int c = 0; c < 3; ++c) {
          const M take = (cand[c] > m) | (cand[c] != cand[c]);
          m = take ? cand[c] : m;
          k = take ? M{} + (c + 1) : k;
        }
        cstore_first(y + q0, m, n);
        store_where<T>(w + q0, k, n);
      }
    }
  }
}

template <typename T>
void pool2_backward(const void* gyv, const uint8_t* where, int64_t planes, int64_t H, int64_t W, void* gxv) {
  using P = PoolVec<T>;
  using V = typename P::V;
  using M = typename P::M;
  constexpr int L = P::L;
  const T* __restrict GY = static_cast<const T*>(gyv);
  T* __restrict GX = static_cast<T*>(gxv);
  const int64_t OH = H / 2, OW = W / 2;
  const M lower = P::iota(1, 0) / 2 + (P::iota(1, 0) % 2) * L;  // (e0, o0, e1, o1, ...): lanes 0..L/2
  const M upper = lower + L / 2;                                // ... and L/2..L
  const V zero{};
  for (int64_t p = 0; p < planes; ++p) {
    for (int64_t r = 0; r < OH; ++r) {
      const T* __restrict g = GY + (p * OH + r) * OW;
      const uint8_t* __restrict w = where + (p * OH + r) * OW;
      T* __restrict d[2] = {GX + (p * H + 2 * r) * W, GX + (p * H + 2 * r + 1) * W};
      for (int64_t q0 = 0; q0 < OW; q0 += L) {
        const int64_t n = OW - q0 < L ? OW - q0 : L, out = 2 * n;
        // + 0: gx is 0 + gy at the kept element, as aten's zeros-then-add (a -0 gy gives +0)
        const V gv = cload_first(g + q0, n) + zero;
        const M k = load_where<T>(w + q0, n);  // (lanes >= n: never stored below)
#pragma GCC unroll 2
        for (int a = 0; a < 2; ++a) {
          const V e = k == 2 * a ? gv : zero, o = k == 2 * a + 1 ? gv : zero;
          const V v0 = shuffle2(e, o, lower), v1 = shuffle2(e, o, upper);
          cstore_first(d[a] + 2 * q0, v0, out);
          cstore_first(d[a] + 2 * q0 + L, v1, out - L);
        }
      }
      if (W % 2) d[0][W - 1] = d[1][W - 1] = T(0);
    }
    if (H % 2) std::memset(GX + (p * H + H - 1) * W, 0, sizeof(T) * W);
  }
}

template <typename T, int NV, int RI, bool HALF>
constexpr CorrFn corr_entry() {
  if constexpr (NV * kRows[RI] <= kAccBudget && (!HALF || NV >= 2))
    return &correlate<T, NV, kRows[RI], HALF>;
  else
    return nullptr;
}

template <typename T, int NV, bool HALF, int... RI>
void fill_rows(CorrFn* dst, std::integer_sequence<int, RI...>) {
  ((dst[RI] = corr_entry<T, NV, RI, HALF>()), ...);
}

template <typename T, bool HALF = false>
void fill_corr(CorrFn (*dst)[kRowChoices]) {
  using Seq = std::make_integer_sequence<int, kRowChoices>;
  fill_rows<T, 1, HALF>(dst[0], Seq{});
  fill_rows<T, 2, HALF>(dst[1], Seq{});
  fill_rows<T, 3, HALF>(dst[2], Seq{});
  fill_rows<T, 4, HALF>(dst[3], Seq{});
}

}  // namespace

ConvKernelTable make_conv_table() {
  static_assert(kMaxNV == 4, "fill_corr instantiates NV = 1..4");
  ConvKernelTable t{};
  t.isa = ST_ISA_NAME;
  t.vector_bytes = ST_VECTOR_BYTES;
  t.acc_budget = kAccBudget;
  fill_corr<float>(t.corr_f32);
  fill_corr<double>(t.corr_f64);
#if ST_VECTOR_BYTES == 32
  fill_corr<float, true>(t.corr_half_f32);  // only where a half vector costs half (see CHalf)
#endif
  t.dot_f32 = &dots<float>;
  t.dot_f64 = &dots<double>;
  t.dot_shifted_f32 = &dots_shifted<float>;
  t.dot_shifted_f64 = &dots_shifted<double>;
  t.pack_f32 = &pack_planes<float>;
  t.pack_f64 = &pack_planes<double>;
  t.pool2_f32 = &pool2<float>;
  t.pool2_f64 = &pool2<double>;
  t.pool2_backward_f32 = &pool2_backward<float>;
  t.pool2_backward_f64 = &pool2_backward<double>;
  return t;
}

}  // namespace ST_ISA
}  // namespace cpu
}  // namespace sparseticket
