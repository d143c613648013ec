// sparseticket CPU kernel core, written once and compiled per ISA.
//
// The including file sets the target (#pragma GCC target), ST_ISA (namespace name),
// ST_VECTOR_BYTES and ST_HAS_FMA, then includes this file. Everything here is
// torch-free and internal linkage (anonymous namespace) except make_table(), so the
// AVX-512 instantiations can never be picked by the linker for another ISA's caller.
//
// Vectors are GCC vector extensions, so one source serves 64-, 32- and 16-byte
// registers; the compiler maps `acc += w * x` to FMA where the target has it.

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#if ST_VECTOR_BYTES >= 32
#include <immintrin.h>
#endif

#include "kernels.h"

namespace sparseticket {
namespace cpu {
namespace ST_ISA {
namespace {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(ST_VECTOR_BYTES), aligned(4)));
  static constexpr int L = ST_VECTOR_BYTES / 4;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(ST_VECTOR_BYTES), aligned(8)));
  static constexpr int L = ST_VECTOR_BYTES / 8;
};

// Under the AVX2 target GCC expands a 32-byte __builtin_memcpy into two 16-byte moves
// through the stack, and the 32-byte reload misses store forwarding (spmm ran ~16x
// slower than with AVX-512), so AVX2 loads and stores use the intrinsics.
template <typename T>
inline typename Vec<T>::type vload(const T* p) {
#if ST_VECTOR_BYTES == 32
  if constexpr (sizeof(T) == 4)
    return reinterpret_cast<typename Vec<T>::type>(_mm256_loadu_ps(reinterpret_cast<const float*>(p)));
  else
    return reinterpret_cast<typename Vec<T>::type>(_mm256_loadu_pd(reinterpret_cast<const double*>(p)));
#else
  typename Vec<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
#endif
}

template <typename T>
inline void vstore(T* p, typename Vec<T>::type v) {
#if ST_VECTOR_BYTES == 32
  if constexpr (sizeof(T) == 4)
    _mm256_storeu_ps(reinterpret_cast<float*>(p), reinterpret_cast<__m256>(v));
  else
    _mm256_storeu_pd(reinterpret_cast<double*>(p), reinterpret_cast<__m256d>(v));
#else
  __builtin_memcpy(p, &v, sizeof(v));
#endif
}

// Horizontal sums. The generic tree is for 16-byte vectors; wider ones use the
// extract-and-add sequences of their ISA (GCC's scalarised tree for a 16-lane vector
// was ~30 instructions).
template <typename T>
inline T hsum(typename Vec<T>::type v) {
  constexpr int L = Vec<T>::L;
  T lanes[L];
  __builtin_memcpy(lanes, &v, sizeof(v));
#pragma GCC unroll 16
  for (int w = L / 2; w >= 1; w /= 2)
#pragma GCC unroll 16
    for (int i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  return lanes[0];
}
#if ST_VECTOR_BYTES == 64
template <>
inline float hsum<float>(Vec<float>::type v) { return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v)); }
template <>
inline double hsum<double>(Vec<double>::type v) { return _mm512_reduce_add_pd(reinterpret_cast<__m512d>(v)); }
#elif ST_VECTOR_BYTES == 32
template <>
inline float hsum<float>(Vec<float>::type v) {
  const __m256 x = reinterpret_cast<__m256>(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
template <>
inline double hsum<double>(Vec<double>::type v) {
  const __m256d x = reinterpret_cast<__m256d>(v);
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}
#endif

// out[0..3] = horizontal sums of c0..c3.
template <typename T>
inline void hsum4(typename Vec<T>::type c0, typename Vec<T>::type c1, typename Vec<T>::type c2,
                  typename Vec<T>::type c3, T* out) {
  out[0] = hsum<T>(c0);
  out[1] = hsum<T>(c1);
  out[2] = hsum<T>(c2);
  out[3] = hsum<T>(c3);
}
#if ST_VECTOR_BYTES == 64
// Four 16-lane sums at once: interleave-and-add until each 128-bit lane holds
// [s0, s1, s2, s3] partial sums, then fold the four 128-bit lanes (11 instructions
// for four sums instead of ~8 each).
template <>
inline void hsum4<float>(Vec<float>::type c0, Vec<float>::type c1, Vec<float>::type c2, Vec<float>::type c3,
                         float* out) {
  const __m512 a0 = reinterpret_cast<__m512>(c0), a1 = reinterpret_cast<__m512>(c1);
  const __m512 a2 = reinterpret_cast<__m512>(c2), a3 = reinterpret_cast<__m512>(c3);
  const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, 0x44), _mm512_shuffle_ps(t01, t23, 0xEE));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
#endif

// a * b + c with one rounding where the ISA has FMA (as ATen's vectorised add does).
inline float fmadd(float a, float b, float c) {
#if ST_HAS_FMA
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}
inline double fmadd(double a, double b, double c) {
#if ST_HAS_FMA
  return __builtin_fma(a, b, c);
#else
  return a * b + c;
#endif
}

// ----------------------------------------------------------------------------- packing
//
// dst[k * pw + lane] = X[lane * sb + k * sk] for lane < nb, 0 for nb <= lane < pw, for k
// in [k0, k1): the transpose of a [nb, K] slab into batch-contiguous rows. For the
// common row-major float case the AVX-512 build moves 16x16 blocks through registers.

template <typename T>
void pack_scalar(const T* __restrict X, int64_t sb, int64_t sk, T* __restrict dst, int64_t pw, int64_t nb,
                 int64_t k0, int64_t k1, int64_t lane0) {
  for (int64_t lane = lane0; lane < nb; ++lane) {
    const T* src = X + lane * sb;
    for (int64_t k = k0; k < k1; ++k) dst[k * pw + lane] = src[k * sk];
  }
}

#if ST_VECTOR_BYTES == 64
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16], v[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      v[8 * i + j] = _mm512_shuffle_f32x4(u[8 * i + j], u[8 * i + 4 + j], 0x88);
      v[8 * i + 4 + j] = _mm512_shuffle_f32x4(u[8 * i + j], u[8 * i + 4 + j], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(v[j], v[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(v[j], v[8 + j], 0xDD);
  }
}
#elif ST_VECTOR_BYTES == 32
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}
// all-ones in the first n of 8 float lanes
inline __m256i first8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

template <typename T>
void pack_kernel(const void* Xv, int64_t sb, int64_t sk, void* dstv, int64_t pw, int64_t nb, int64_t k0, int64_t k1) {
  const T* X = static_cast<const T*>(Xv);
  T* dst = static_cast<T*>(dstv);
  int64_t lane_done = 0;
#if ST_VECTOR_BYTES == 64
  if (sizeof(T) == 4 && sk == 1 && pw % 16 == 0) {
    // Every 16-lane block up to pw goes through the register transpose, the ragged last
    // block of the batch and the zero padding included (rows past nb load as zeros), and
    // the K tail uses masked loads: B=60 left 12 lanes + 4 of padding to a scalar
    // strided loop that took most of the time (784x60 pack: ~30 us -> ~8 us, 1 thread).
    const float* Xf = reinterpret_cast<const float*>(X);
    float* df = reinterpret_cast<float*>(dst);
    for (int64_t l = 0; l < pw; l += 16) {
      const int64_t nl = nb - l < 0 ? 0 : (nb - l > 16 ? 16 : nb - l);
      for (int64_t k = k0; k < k1; k += 16) {
        const int64_t nk = k1 - k < 16 ? k1 - k : 16;
        const __mmask16 km = static_cast<__mmask16>(nk == 16 ? 0xFFFFu : (1u << nk) - 1u);
        __m512 r[16];
        for (int i = 0; i < 16; ++i)
          r[i] = i < nl ? _mm512_maskz_loadu_ps(km, Xf + (l + i) * sb + k) : _mm512_setzero_ps();
        transpose16(r);
        for (int i = 0; i < nk; ++i) _mm512_storeu_ps(df + (k + i) * pw + l, r[i]);
      }
    }
    return;
  }
#elif ST_VECTOR_BYTES == 32
  if (sizeof(T) == 4 && sk == 1 && pw % 8 == 0) {
    // The same with 8x8 register transposes (the scalar strided loop was ~4x slower)
    const float* Xf = reinterpret_cast<const float*>(X);
    float* df = reinterpret_cast<float*>(dst);
    for (int64_t l = 0; l < pw; l += 8) {
      const int64_t nl = nb - l < 0 ? 0 : (nb - l > 8 ? 8 : nb - l);
      for (int64_t k = k0; k < k1; k += 8) {
        const int64_t nk = k1 - k < 8 ? k1 - k : 8;
        const __m256i km = first8(nk);
        __m256 r[8];
        for (int i = 0; i < 8; ++i)
          r[i] = i >= nl ? _mm256_setzero_ps()
                 : nk == 8 ? _mm256_loadu_ps(Xf + (l + i) * sb + k)
                           : _mm256_maskload_ps(Xf + (l + i) * sb + k, km);
        transpose8(r);
        for (int i = 0; i < nk; ++i) _mm256_storeu_ps(df + (k + i) * pw + l, r[i]);
      }
    }
    return;
  }
#endif
  pack_scalar<T>(X, sb, sk, dst, pw, nb, k0, k1, lane_done);
  for (int64_t k = k0; k < k1; ++k)
    for (int64_t lane = nb; lane < pw; ++lane) dst[k * pw + lane] = T(0);
}

// ----------------------------------------------------------------------------- SpMM
//
// Row-split CSR times a packed, batch-contiguous dense operand. Each sparse entry
// broadcasts one weight and FMAs it into NV vector accumulators that hold a panel of
// the batch for the current output row, so the inner loop is NV loads + NV FMAs per
// kept weight and nothing else. Rows are processed in tiles of kTileRows so the
// transposed write-back to a row-major [B, R] output touches kTileRows contiguous
// elements per batch entry.

constexpr int kTileRows = 16;

// acc[0..NV) += sum over entries [e, e1) of val(e) * P[idx[e]]. For narrow panels the FMA
// chain per accumulator would stall on latency, so consecutive entries go to U
// independent accumulator sets that are summed at the end: 8 chains in all (two FMA
// pipes of latency 4) for the forward; 4 where each weight is gathered through perm (the
// transposed product), which is bound by those loads. Measured in-process, 1 thread,
// 8 against 4 chains: forward 60x784x300 at 10/35/65% 1.02-1.06x / 1.03-1.08x /
// 1.01-1.16x (two runs), 60x300x100 1.01-1.06x / 1.04-1.11x / 0.99-1.12x, 3.6% and
// NV = 8 shapes 0.98-1.01x; the transposed product 0.90-1.04x, so it keeps 4.
template <typename T, int NV, bool HasPerm>
inline void spmm_row_entries(typename Vec<T>::type* acc, const T* __restrict P, const int32_t* __restrict idx,
                             const int32_t* __restrict perm, const T* __restrict val, int64_t e, int64_t e1) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  constexpr int PW = NV * L;
  constexpr int C = HasPerm ? 4 : 8;
  constexpr int U = NV >= C ? 1 : C / NV;
  V part[U][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) part[0][v] = acc[v];
#pragma GCC unroll 8
  for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) part[u][v] = V{};
  for (; e + U <= e1; e += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const T w = HasPerm ? val[perm[e + u]] : val[e + u];
      const T* __restrict xr = P + static_cast<int64_t>(idx[e + u]) * PW;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) part[u][v] += w * vload(xr + v * L);
    }
  }
  for (; e < e1; ++e) {
    const T w = HasPerm ? val[perm[e]] : val[e];
    const T* __restrict xr = P + static_cast<int64_t>(idx[e]) * PW;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) part[0][v] += w * vload(xr + v * L);
  }
#pragma GCC unroll 8
  for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) part[0][v] += part[u][v];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = part[0][v];
}

// out[b, r] = tile[r - r0][b - b0] + bias[r] for the nr rows from r0 and this panel's
// batch entries (tile rows are PW apart), through max(0, .) when a.relu: the ReLU of
// sparse_linear_relu costs nothing here (max(0, v) keeps a NaN v, as torch.relu does).
template <typename T, int PW>
inline void spmm_write_tile(const SpmmArgs& a, const T (*tile)[PW], int64_t r0, int nr, int64_t b0) {
  const T* __restrict bias = static_cast<const T*>(a.bias);
  T* __restrict out = static_cast<T*>(a.out);
  const int nb = static_cast<int>(a.B - b0 < PW ? a.B - b0 : PW);
  T bias_tile[kTileRows];
  for (int rr = 0; rr < nr; ++rr) bias_tile[rr] = bias ? bias[r0 + rr] : T(0);
#if ST_VECTOR_BYTES == 64
  if (sizeof(T) == 4 && a.ldo_r == 1) {
    // 16x16 register transposes: each batch entry's nr outputs leave as one masked
    // vector store instead of nr scalar loads strided by the panel width
    const __mmask16 rm = static_cast<__mmask16>(nr == 16 ? 0xFFFFu : (1u << nr) - 1u);
    const __m512 bv = _mm512_maskz_loadu_ps(rm, reinterpret_cast<const float*>(bias_tile));
    for (int l = 0; l < nb; l += 16) {
      __m512 t[16];
      for (int rr = 0; rr < 16; ++rr)
        t[rr] = rr < nr ? _mm512_load_ps(reinterpret_cast<const float*>(&tile[rr][l])) : _mm512_setzero_ps();
      transpose16(t);
      const int nl = nb - l < 16 ? nb - l : 16;
      const __m512 zero = _mm512_setzero_ps();
      for (int i = 0; i < nl; ++i) {
        __m512 v = _mm512_add_ps(t[i], bv);
        if (a.relu) v = _mm512_max_ps(zero, v);
        _mm512_mask_storeu_ps(reinterpret_cast<float*>(out + (b0 + l + i) * a.ldo_b + r0), rm, v);
      }
    }
    return;
  }
#elif ST_VECTOR_BYTES == 32
  if (sizeof(T) == 4 && a.ldo_r == 1 && PW % 8 == 0) {
    // 8x8 register transposes, a half tile of rows at a time
    for (int h = 0; h < nr; h += 8) {
      const int nh = nr - h < 8 ? nr - h : 8;
      const __m256i rm = first8(nh);
      const __m256 bv = _mm256_maskload_ps(reinterpret_cast<const float*>(bias_tile + h), rm);
      for (int l = 0; l < nb; l += 8) {
        __m256 t[8];
        for (int rr = 0; rr < 8; ++rr)
          t[rr] = rr < nh ? _mm256_loadu_ps(reinterpret_cast<const float*>(&tile[h + rr][l])) : _mm256_setzero_ps();
        transpose8(t);
        const int nl = nb - l < 8 ? nb - l : 8;
        float* o = reinterpret_cast<float*>(out + (b0 + l) * a.ldo_b + r0 + h);
        const __m256 zero = _mm256_setzero_ps();
        for (int i = 0; i < nl; ++i) {
          __m256 v = _mm256_add_ps(t[i], bv);
          if (a.relu) v = _mm256_max_ps(zero, v);
          if (nh == 8)
            _mm256_storeu_ps(o + i * a.ldo_b, v);
          else
            _mm256_maskstore_ps(o + i * a.ldo_b, rm, v);
        }
      }
    }
    return;
  }
#endif
  const bool relu = a.relu;
  auto fin = [relu](T v) { return relu && T(0) > v ? T(0) : v; };
  if (a.ldo_r == 1) {
    for (int b = 0; b < nb; ++b) {
      T* __restrict o = out + (b0 + b) * a.ldo_b + r0;
      for (int rr = 0; rr < nr; ++rr) o[rr] = fin(tile[rr][b] + bias_tile[rr]);
    }
  } else {
    for (int rr = 0; rr < nr; ++rr) {
      T* __restrict o = out + (r0 + rr) * a.ldo_r + b0 * a.ldo_b;
      for (int b = 0; b < nb; ++b) o[b * a.ldo_b] = fin(tile[rr][b] + bias_tile[rr]);
    }
  }
}

// Unblocked: each row visits all its entries at once, reading its panel rows from
// wherever they are (L2 for the panel sizes panel_choice picks).
template <typename T, int NV, bool HasPerm>
void spmm_kernel_impl(const SpmmArgs& a, int64_t r_begin, int64_t r_end) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  constexpr int PW = NV * L;
  const T* __restrict val = static_cast<const T*>(a.val);
  const T* __restrict packed = static_cast<const T*>(a.packed);
  const int64_t n_panels = (a.B + PW - 1) / PW;

  alignas(64) T tile[kTileRows][PW];

  // Panel-outer: one panel of the packed operand (sized by the caller to fit in L2)
  // stays resident while this thread's rows stream past it.
  for (int64_t panel = 0; panel < n_panels; ++panel) {
    const T* __restrict P = packed + panel * a.K * PW;
    for (int64_t r0 = r_begin; r0 < r_end; r0 += kTileRows) {
      const int nr = static_cast<int>(r_end - r0 < kTileRows ? r_end - r0 : kTileRows);
      for (int rr = 0; rr < nr; ++rr) {
        V acc[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[v] = V{};
        spmm_row_entries<T, NV, HasPerm>(acc, P, a.idx, a.perm, val, a.ptr[r0 + rr], a.ptr[r0 + rr + 1]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) vstore(&tile[rr][v * L], acc[v]);
      }
      spmm_write_tile<T, PW>(a, tile, r0, nr, panel * PW);
    }
  }
}

// Column-blocked: the panel is cut into blocks of k_block rows that fit in L1 with the
// accumulator tile, and a block of kBlockRows output rows visits block after block
// (a cursor per row walks its sorted column indices). Each kept weight then loads its
// panel row from L1, and the panel streams from L2 in order, once per row block,
// instead of at a data-dependent address per kept weight.
// 64 rows: 16 and 32 were up to 10% slower at 256x1024x1024 (fewer visits share each
// block); the tile (64 x PW, <= 32 KB) then lives partly in L2, which costs little as
// each row's accumulators are reloaded once per block.
constexpr int kBlockRows = 64;

template <typename T, int NV, bool HasPerm>
void spmm_blocked_impl(const SpmmArgs& a, int64_t r_begin, int64_t r_end) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  constexpr int PW = NV * L;
  const int32_t* __restrict ptr = a.ptr;
  const int32_t* __restrict idx = a.idx;
  const T* __restrict val = static_cast<const T*>(a.val);
  const T* __restrict packed = static_cast<const T*>(a.packed);
  const int64_t n_panels = (a.B + PW - 1) / PW;
  const int64_t KB = a.k_block;

  alignas(64) T tile[kBlockRows][PW];
  int64_t cursor[kBlockRows];

  for (int64_t panel = 0; panel < n_panels; ++panel) {
    const T* __restrict P = packed + panel * a.K * PW;
    for (int64_t r0 = r_begin; r0 < r_end; r0 += kBlockRows) {
      const int nr = static_cast<int>(r_end - r0 < kBlockRows ? r_end - r0 : kBlockRows);
      for (int rr = 0; rr < nr; ++rr) {
        cursor[rr] = ptr[r0 + rr];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) vstore(&tile[rr][v * L], V{});
      }
      // Each block visit reads a few entries of every row, 2 x nr interleaved streams
      // the hardware prefetcher does not follow; when the structure is not cache-resident
      // (128x4096x4096) every visit waited on L3/DRAM (3x slower than unblocked). The next
      // row block's entries are contiguous, so they are prefetched into L2 in slices, one
      // per column block.
      const int64_t nx0 = ptr[r0 + nr < r_end ? r0 + nr : r_end];
      const int64_t nx1 = ptr[r0 + nr + kBlockRows < r_end ? r0 + nr + kBlockRows : r_end];
      const int64_t n_kb = (a.K + KB - 1) / KB;
      const int64_t slice = (nx1 - nx0 + n_kb - 1) / n_kb;
      int64_t pf = nx0;
      const void* pf_val = a.perm ? static_cast<const void*>(a.perm) : static_cast<const void*>(val);
      for (int64_t k1 = KB;; k1 += KB) {
        const bool last = k1 >= a.K;
        const int64_t pf_end = pf + slice < nx1 ? pf + slice : nx1;
        for (int64_t e = pf; e < pf_end; e += 64 / sizeof(int32_t)) __builtin_prefetch(idx + e, 0, 2);
        for (int64_t e = pf; e < pf_end; e += 64 / sizeof(T))
          __builtin_prefetch(static_cast<const char*>(pf_val) + e * (a.perm ? sizeof(int32_t) : sizeof(T)), 0, 2);
        pf = pf_end;
        for (int rr = 0; rr < nr; ++rr) {
          const int64_t e0 = cursor[rr], e_end = ptr[r0 + rr + 1];
          int64_t e1 = e_end;
          if (!last) {
            e1 = e0;
            while (e1 < e_end && idx[e1] < k1) ++e1;
          }
          if (e1 == e0) continue;
          V acc[NV];
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[v] = vload(&tile[rr][v * L]);
          spmm_row_entries<T, NV, HasPerm>(acc, P, idx, a.perm, val, e0, e1);
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) vstore(&tile[rr][v * L], acc[v]);
          cursor[rr] = e1;
        }
        if (last) break;
      }
      for (int t0 = 0; t0 < nr; t0 += kTileRows)
        spmm_write_tile<T, PW>(a, tile + t0, r0 + t0, nr - t0 < kTileRows ? nr - t0 : kTileRows, panel * PW);
    }
  }
}

template <typename T, int NV>
void spmm_kernel(const SpmmArgs& a, int64_t r_begin, int64_t r_end) {
  const bool blocked = a.k_block > 0 && a.k_block < a.K;
  if (blocked && a.perm)
    spmm_blocked_impl<T, NV, true>(a, r_begin, r_end);
  else if (blocked)
    spmm_blocked_impl<T, NV, false>(a, r_begin, r_end);
  else if (a.perm)
    spmm_kernel_impl<T, NV, true>(a, r_begin, r_end);
  else
    spmm_kernel_impl<T, NV, false>(a, r_begin, r_end);
}

// ----------------------------------------------------------------------------- SDDMM
//
// One dot product over the batch per kept weight. Four entries of a row share the
// loads of the row's gradient vector, and their four accumulators are independent, so
// the loop is bound by the loads of X rows.

template <typename T>
inline void sddmm_entries(const T* __restrict ar, const T* __restrict X, const int32_t* __restrict idx, int64_t e,
                          int64_t e1, int64_t ld, T* __restrict out) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  for (; e + 4 <= e1; e += 4) {
    const T* __restrict x0 = X + static_cast<int64_t>(idx[e]) * ld;
    const T* __restrict x1 = X + static_cast<int64_t>(idx[e + 1]) * ld;
    const T* __restrict x2 = X + static_cast<int64_t>(idx[e + 2]) * ld;
    const T* __restrict x3 = X + static_cast<int64_t>(idx[e + 3]) * ld;
    V c0{}, c1{}, c2{}, c3{};
    for (int64_t c = 0; c < ld; c += L) {
      const V av = vload(ar + c);
      c0 += av * vload(x0 + c);
      c1 += av * vload(x1 + c);
      c2 += av * vload(x2 + c);
      c3 += av * vload(x3 + c);
    }
    hsum4<T>(c0, c1, c2, c3, out + e);
  }
  for (; e < e1; ++e) {
    const T* __restrict x0 = X + static_cast<int64_t>(idx[e]) * ld;
    V c0{};
    for (int64_t c = 0; c < ld; c += L) c0 += vload(ar + c) * vload(x0 + c);
    out[e] = hsum<T>(c0);
  }
}

// The same with the row's gradient vector held in NV registers (ld == NV * L): per
// entry only its X row is loaded, NV loads for NV FMAs instead of 1.25 NV.
template <typename T, int NV>
inline void sddmm_entries_reg(const T* __restrict ar, const T* __restrict X, const int32_t* __restrict idx,
                              int64_t e, int64_t e1, T* __restrict out) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  constexpr int64_t ld = NV * L;
  V av[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) av[v] = vload(ar + v * L);
  for (; e + 4 <= e1; e += 4) {
    const T* __restrict x0 = X + static_cast<int64_t>(idx[e]) * ld;
    const T* __restrict x1 = X + static_cast<int64_t>(idx[e + 1]) * ld;
    const T* __restrict x2 = X + static_cast<int64_t>(idx[e + 2]) * ld;
    const T* __restrict x3 = X + static_cast<int64_t>(idx[e + 3]) * ld;
    V c0{}, c1{}, c2{}, c3{};
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      c0 += av[v] * vload(x0 + v * L);
      c1 += av[v] * vload(x1 + v * L);
      c2 += av[v] * vload(x2 + v * L);
      c3 += av[v] * vload(x3 + v * L);
    }
    hsum4<T>(c0, c1, c2, c3, out + e);
  }
  for (; e < e1; ++e) {
    const T* __restrict x0 = X + static_cast<int64_t>(idx[e]) * ld;
    V c0{};
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) c0 += av[v] * vload(x0 + v * L);
    out[e] = hsum<T>(c0);
  }
}

// Register widths instantiated: up to 16 vectors with AVX-512's 32 registers, 8 with
// AVX2's / SSE's 16 (the row plus four accumulators must not spill).
constexpr int kSddmmMaxRegNV = ST_VECTOR_BYTES == 64 ? 16 : 8;

template <typename T>
using SddmmEntriesFn = void (*)(const T*, const T*, const int32_t*, int64_t, int64_t, T*);

template <typename T, int NV>
void sddmm_entries_reg_fn(const T* ar, const T* X, const int32_t* idx, int64_t e, int64_t e1, T* out) {
  sddmm_entries_reg<T, NV>(ar, X, idx, e, e1, out);
}

template <typename T, int... NVs>
SddmmEntriesFn<T> sddmm_pick(int64_t nv, std::integer_sequence<int, NVs...>) {
  SddmmEntriesFn<T> fn = nullptr;
  ((fn = nv == NVs + 1 ? &sddmm_entries_reg_fn<T, NVs + 1> : fn), ...);
  return fn;
}

// The X rows an entry reads are random. Blocked (k_block > 0), the entries are visited
// in blocks of k_block X rows: a per-row cursor walks each row's sorted indices, and
// row_block rows (0: all of this call's rows) visit one block after another. Two uses:
// an X larger than a core's L2 is read block by block from L2 instead of from L3 (all
// rows per block), and a smaller X in L1-sized blocks by 64-row groups, so the X rows
// of a group's entries come from L1 (see sddmm_blocking in ops_cpu.cpp).
template <typename T>
void sddmm_kernel(const SddmmArgs& s, int64_t r_begin, int64_t r_end) {
  const int32_t* __restrict ptr = s.ptr;
  const int32_t* __restrict idx = s.idx;
  const T* __restrict A = static_cast<const T*>(s.a);
  const T* __restrict X = static_cast<const T*>(s.x);
  T* __restrict out = static_cast<T*>(s.out);
  const int64_t ld = s.ld;
  const bool blocked = s.k_block > 0 && s.k_block < s.K;
  const SddmmEntriesFn<T> reg =
      sddmm_pick<T>(ld / Vec<T>::L, std::make_integer_sequence<int, kSddmmMaxRegNV>{});
  auto entries = [&](int64_t r, int64_t e0, int64_t e1) {
    if (reg)
      reg(A + r * ld, X, idx, e0, e1, out);
    else
      sddmm_entries<T>(A + r * ld, X, idx, e0, e1, ld, out);
  };

  for (int64_t r = r_begin; r < r_end; ++r) {
    if (s.active && !s.active[r]) {
      for (int64_t e = ptr[r]; e < ptr[r + 1]; ++e) out[e] = T(0);
    } else if (!blocked) {
      entries(r, ptr[r], ptr[r + 1]);
    }
  }
  if (!blocked) return;
  const int64_t rb = s.row_block > 0 ? s.row_block : r_end - r_begin;
  int64_t* cursor = static_cast<int64_t*>(__builtin_malloc(sizeof(int64_t) * rb));
  for (int64_t r0 = r_begin; r0 < r_end; r0 += rb) {
    const int64_t nr = r_end - r0 < rb ? r_end - r0 : rb;
    for (int64_t rr = 0; rr < nr; ++rr) cursor[rr] = ptr[r0 + rr];
    for (int64_t k1 = s.k_block;; k1 += s.k_block) {
      const bool last = k1 >= s.K;
      for (int64_t rr = 0; rr < nr; ++rr) {
        const int64_t r = r0 + rr;
        if (s.active && !s.active[r]) continue;
        const int64_t e0 = cursor[rr], e_end = ptr[r + 1];
        int64_t e1 = e_end;
        if (!last) {
          e1 = e0;
          while (e1 < e_end && idx[e1] < k1) ++e1;
        }
        if (e1 > e0) entries(r, e0, e1);
        cursor[rr] = e1;
      }
      if (last) break;
    }
  }
  __builtin_free(cursor);
}

// ----------------------------------------------------------------------------- SGD
//
// torch.optim.SGD's maths in one pass over p, g, buf and the masks. The adds that
// torch performs as `a.add_(b, alpha=s)` are written as fma(b, s, a), which is what
// ATen's vectorised CPU add does, so kept weights follow torch closely.

template <typename T, bool HasBuf, bool HasKeep, bool HasActive>
void sgd_kernel_impl(const SgdArgs& s, int64_t begin, int64_t end) {
  T* __restrict p = static_cast<T*>(s.p);
  const T* __restrict g = static_cast<const T*>(s.g);
  T* __restrict buf = static_cast<T*>(s.buf);
  const uint8_t* __restrict keep = s.keep;
  const uint8_t* __restrict active = s.active;
  const T lr = static_cast<T>(s.lr), wd = static_cast<T>(s.weight_decay), mom = static_cast<T>(s.momentum);
  const T damp1 = static_cast<T>(1.0 - s.dampening);
  const T gsign = s.maximize ? T(-1) : T(1);
  const bool fresh = s.fresh, nesterov = s.nesterov, use_wd = s.weight_decay != 0;

#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const T p0 = p[i];
    T d = gsign * g[i];
    if (use_wd) d = fmadd(p0, wd, d);
    T b1 = T(0);
    if (HasBuf) {
      const T b0 = buf[i];
      b1 = fresh ? d : fmadd(d, damp1, b0 * mom);
      d = nesterov ? fmadd(b1, mom, d) : b1;
      if (HasKeep) b1 = keep[i] ? b1 : T(0);
      if (HasActive) b1 = active[i] ? b1 : b0;
      buf[i] = b1;
    }
    T p1 = fmadd(d, -lr, p0);
    if (HasKeep) p1 = keep[i] ? p1 : T(0);
    if (HasActive) p1 = active[i] ? p1 : p0;
    p[i] = p1;
  }
}

template <typename T>
void sgd_kernel(const SgdArgs& s, int64_t begin, int64_t end) {
  const bool hb = s.buf != nullptr, hk = s.keep != nullptr, ha = s.active != nullptr;
#define ST_SGD_CASE(B, K, A) \
  if (hb == B && hk == K && ha == A) return sgd_kernel_impl<T, B, K, A>(s, begin, end);
  ST_SGD_CASE(false, false, false)
  ST_SGD_CASE(false, false, true)
  ST_SGD_CASE(false, true, false)
  ST_SGD_CASE(false, true, true)
  ST_SGD_CASE(true, false, false)
  ST_SGD_CASE(true, false, true)
  ST_SGD_CASE(true, true, false)
  ST_SGD_CASE(true, true, true)
#undef ST_SGD_CASE
}

// ----------------------------------------------------------------------------- AdamW
//
// torch.optim.AdamW, per element: decoupled decay, lerp of the first moment, second
// moment, bias corrections, p -= step_size * m / (sqrt(v) / sqrt(bc2) + eps).

template <typename T, bool AmsGrad, bool HasKeep, bool HasActive>
void adamw_kernel_impl(const AdamWArgs& s, int64_t begin, int64_t end) {
  T* __restrict p = static_cast<T*>(s.p);
  const T* __restrict g = static_cast<const T*>(s.g);
  T* __restrict m = static_cast<T*>(s.exp_avg);
  T* __restrict v = static_cast<T*>(s.exp_avg_sq);
  T* __restrict vmax = static_cast<T*>(s.max_exp_avg_sq);
  const uint8_t* __restrict keep = s.keep;
  const uint8_t* __restrict active = s.active;
  const double bc1 = 1.0 - __builtin_pow(s.beta1, s.step);
  const double bc2 = 1.0 - __builtin_pow(s.beta2, s.step);
  const T decay = static_cast<T>(1.0 - s.lr * s.weight_decay);
  const T w1 = static_cast<T>(1.0 - s.beta1), b2 = static_cast<T>(s.beta2), w2 = static_cast<T>(1.0 - s.beta2);
  const T step_size = static_cast<T>(s.lr / bc1);
  const T bc2_sqrt = static_cast<T>(__builtin_sqrt(bc2));
  const T eps = static_cast<T>(s.eps);
  const T gsign = s.maximize ? T(-1) : T(1);

#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const T p0 = p[i], m0 = m[i], v0 = v[i];
    const T gi = gsign * g[i];
    const T pd = p0 * decay;
    const T m1 = fmadd(w1, gi - m0, m0);
    const T v1 = fmadd(w2 * gi, gi, v0 * b2);
    T vm0 = T(0), vm1 = v1;
    if (AmsGrad) {
      vm0 = vmax[i];
      vm1 = vm0 > v1 ? vm0 : v1;
    }
    const T denom = __builtin_sqrt(vm1) / bc2_sqrt + eps;
    T p1 = fmadd(-step_size, m1 / denom, pd);
    T m2 = m1, v2 = v1, vm2 = vm1;
    if (HasKeep) {
      const bool k = keep[i];
      p1 = k ? p1 : T(0);
      m2 = k ? m2 : T(0);
      v2 = k ? v2 : T(0);
      vm2 = k ? vm2 : T(0);
    }
    if (HasActive) {
      const bool a = active[i];
      p1 = a ? p1 : p0;
      m2 = a ? m2 : m0;
      v2 = a ? v2 : v0;
      vm2 = a ? vm2 : vm0;
    }
    p[i] = p1;
    m[i] = m2;
    v[i] = v2;
    if (AmsGrad) vmax[i] = vm2;
  }
}

template <typename T>
void adamw_kernel(const AdamWArgs& s, int64_t begin, int64_t end) {
  const bool ams = s.max_exp_avg_sq != nullptr, hk = s.keep != nullptr, ha = s.active != nullptr;
#define ST_ADAMW_CASE(A, K, H) \
  if (ams == A && hk == K && ha == H) return adamw_kernel_impl<T, A, K, H>(s, begin, end);
  ST_ADAMW_CASE(false, false, false)
  ST_ADAMW_CASE(false, false, true)
  ST_ADAMW_CASE(false, true, false)
  ST_ADAMW_CASE(false, true, true)
  ST_ADAMW_CASE(true, false, false)
  ST_ADAMW_CASE(true, false, true)
  ST_ADAMW_CASE(true, true, false)
  ST_ADAMW_CASE(true, true, true)
#undef ST_ADAMW_CASE
}

// ----------------------------------------------------------------------------- bitmap expand / compress
// One bit per weight instead of an int32 column per kept weight: with AVX-512 a 16-lane
// (8 for double) chunk of a row is one mask, one register expand (or compress) and one
// store, so the dense path of a sparse layer materialises W at memory speed instead of
// ~1 ns per kept weight for an indexed scatter. The register forms of expand/compress
// are used with masked loads/stores: their memory forms are microcoded on Zen 4.

#if ST_VECTOR_BYTES == 32
// AVX2 has no expand/compress instructions: a chunk of 8 floats (4 doubles) is one
// vpermps through a table indexed by the chunk's mask bits (256 or 16 rows of 8 lane
// indices, 10 KB in all), plus a blend with zero for expand. Loads and stores are whole
// vectors except where they would cross the end of the row (dense side) or of this
// task's values (compact side), which take the masked forms; bytes of the compact side
// past the current chunk belong to the next chunk of the same task, which overwrites them.
// The scalar loop this replaces mispredicted a branch per weight: 5.3 ns per element of
// a 300x784 ticket at density 0.5, against ~1 ns for one masking multiply.
struct PermTables {
  int32_t expand_f[256][8];    // lane i of the dense chunk takes compact element expand_f[m][i]
  int32_t compress_f[256][8];  // compact element j is dense lane compress_f[m][j]
  int32_t expand_d[16][8];     // the same for 4 doubles, as pairs of float lanes
  int32_t compress_d[16][8];
};
constexpr PermTables make_perm_tables() {
  PermTables t{};
  for (int m = 0; m < 256; ++m) {
    int k = 0;
    for (int i = 0; i < 8; ++i)
      if (m >> i & 1) {
        t.expand_f[m][i] = k;
        t.compress_f[m][k] = i;
        ++k;
      }
  }
  for (int m = 0; m < 16; ++m) {
    int k = 0;
    for (int i = 0; i < 4; ++i)
      if (m >> i & 1) {
        t.expand_d[m][2 * i] = 2 * k;
        t.expand_d[m][2 * i + 1] = 2 * k + 1;
        t.compress_d[m][2 * k] = 2 * i;
        t.compress_d[m][2 * k + 1] = 2 * i + 1;
        ++k;
      }
  }
  return t;
}
alignas(64) constexpr PermTables kPerm = make_perm_tables();

// Lanes of a T vector, as the 32-bit lane masks the AVX2 masked loads, stores and blends take.
template <typename T>
struct Lanes8 {
  static constexpr int L = 32 / sizeof(T);
  // all-ones in the first n lanes
  static __m256i first(int64_t n) {
    if constexpr (sizeof(T) == 4)
      return first8(n);
    else
      return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  // all-ones in the lanes whose bit of m is set
  static __m256i of_bits(uint32_t m) {
    if constexpr (sizeof(T) == 4) {
      const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
      return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), sel), sel);
    } else {
      const __m256i sel = _mm256_setr_epi64x(1, 2, 4, 8);
      return _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(m), sel), sel);
    }
  }
  static __m256 load(const T* p) { return _mm256_loadu_ps(reinterpret_cast<const float*>(p)); }
  static __m256 load(const T* p, __m256i lanes) {
    if constexpr (sizeof(T) == 4)
      return _mm256_maskload_ps(reinterpret_cast<const float*>(p), lanes);
    else
      return _mm256_castpd_ps(_mm256_maskload_pd(reinterpret_cast<const double*>(p), lanes));
  }
  static void store(T* p, __m256 v) { _mm256_storeu_ps(reinterpret_cast<float*>(p), v); }
  static void store(T* p, __m256i lanes, __m256 v) {
    if constexpr (sizeof(T) == 4)
      _mm256_maskstore_ps(reinterpret_cast<float*>(p), lanes, v);
    else
      _mm256_maskstore_pd(reinterpret_cast<double*>(p), lanes, _mm256_castps_pd(v));
  }
  static __m256i perm(const int32_t (&row)[8]) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)); }
  static __m256i expand_perm(uint32_t m) { return perm(sizeof(T) == 4 ? kPerm.expand_f[m] : kPerm.expand_d[m]); }
  static __m256i compress_perm(uint32_t m) { return perm(sizeof(T) == 4 ? kPerm.compress_f[m] : kPerm.compress_d[m]); }
};

// dst[0, K) from the row's bits and its compact values from v (v_end: end of what this task may read)
template <typename T>
inline void expand_row_avx2(const uint64_t* bits, int64_t K, const T* v, const T* v_end, T* dst) {
  using Ln = Lanes8<T>;
  constexpr int64_t L = Ln::L;
  for (int64_t c = 0; c < K; c += L) {
    const int64_t n = K - c < L ? K - c : L;
    const uint32_t m = static_cast<uint32_t>(bits[c >> 6] >> (c & 63)) & ((1u << L) - 1u);
    const int cnt = __builtin_popcount(m);
    const __m256 src = v + L <= v_end ? Ln::load(v) : Ln::load(v, Ln::first(cnt));
    const __m256 y = _mm256_and_ps(_mm256_permutevar8x32_ps(src, Ln::expand_perm(m)),
                                   _mm256_castsi256_ps(Ln::of_bits(m)));
    if (n == L)
      Ln::store(dst + c, y);
    else
      Ln::store(dst + c, Ln::first(n), y);
    v += cnt;
  }
}

// the kept elements of src[0, K) to v (v_end: end of what this task may write)
template <typename T>
inline void compress_row_avx2(const uint64_t* bits, int64_t K, const T* src, T* v, T* v_end) {
  using Ln = Lanes8<T>;
  constexpr int64_t L = Ln::L;
  for (int64_t c = 0; c < K; c += L) {
    const int64_t n = K - c < L ? K - c : L;
    const uint32_t m = static_cast<uint32_t>(bits[c >> 6] >> (c & 63)) & ((1u << L) - 1u);
    const int cnt = __builtin_popcount(m);  // no early exit for m == 0: unpredictable at low density
    const __m256 x = n == L ? Ln::load(src + c) : Ln::load(src + c, Ln::first(n));
    const __m256 y = _mm256_permutevar8x32_ps(x, Ln::compress_perm(m));
    if (v + L <= v_end)
      Ln::store(v, y);
    else
      Ln::store(v, Ln::first(cnt), y);
    v += cnt;
  }
}
#endif

template <typename T>
void expand_rows(const BitmapArgs& a, int64_t r0, int64_t r1) {
  const T* vals = static_cast<const T*>(a.vals);
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* bits = a.bits + r * a.words;
    T* dst = static_cast<T*>(a.dense) + r * a.ld;
    const T* v = vals + a.ptr[r];
#if ST_VECTOR_BYTES == 64  // the AVX-512 translation unit (its #pragma target does not define __AVX512F__)
    constexpr int64_t L = 64 / sizeof(T);
    int64_t c = 0;
    // whole 64-column words first: each chunk's offset into v is the running sum of the
    // popcounts of the chunks before it in the word, all computed from the word at once,
    // so the only serial dependency is one 64-bit popcount per word, not one per chunk
    for (; c + 64 <= a.K; c += 64) {
      const uint64_t word = bits[c >> 6];
      const T* vk = v;
#pragma GCC unroll 8
      for (int k = 0; k < 64 / L; ++k) {
        const uint32_t m = static_cast<uint32_t>(word >> (k * L)) & (L == 16 ? 0xFFFFu : 0xFFu);
        const int cnt = __builtin_popcount(m);
        if constexpr (sizeof(T) == 4) {
          const __m512 loaded = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << cnt) - 1u), vk);
          _mm512_storeu_ps(dst + c + k * L, _mm512_maskz_expand_ps(static_cast<__mmask16>(m), loaded));
        } else {
          const __m512d loaded = _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << cnt) - 1u), vk);
          _mm512_storeu_pd(dst + c + k * L, _mm512_maskz_expand_pd(static_cast<__mmask8>(m), loaded));
        }
        vk += cnt;
      }
      v += __builtin_popcountll(word);
    }
    for (; c < a.K; c += L) {
      const int64_t n = a.K - c < L ? a.K - c : L;
      const uint32_t lanes = n == L ? (L == 16 ? 0xFFFFu : 0xFFu) : ((1u << n) - 1u);
      const uint32_t m = static_cast<uint32_t>(bits[c >> 6] >> (c & 63)) & lanes;
      const int cnt = __builtin_popcount(m);
      if constexpr (sizeof(T) == 4) {
        const __m512 loaded = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << cnt) - 1u), v);
        _mm512_mask_storeu_ps(dst + c, static_cast<__mmask16>(lanes), _mm512_maskz_expand_ps(static_cast<__mmask16>(m), loaded));
      } else {
        const __m512d loaded = _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << cnt) - 1u), v);
        _mm512_mask_storeu_pd(dst + c, static_cast<__mmask8>(lanes), _mm512_maskz_expand_pd(static_cast<__mmask8>(m), loaded));
      }
      v += cnt;
    }
#elif ST_VECTOR_BYTES == 32
    expand_row_avx2<T>(bits, a.K, v, vals + a.ptr[r1], dst);
#else
    for (int64_t c = 0; c < a.K; ++c) {
      const bool kept = (bits[c >> 6] >> (c & 63)) & 1u;
      dst[c] = kept ? *v : T(0);
      v += kept;
    }
#endif
  }
}

template <typename T>
void compress_rows(const BitmapArgs& a, int64_t r0, int64_t r1) {
  T* vals = static_cast<T*>(a.vals);
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* bits = a.bits + r * a.words;
    const T* src = static_cast<const T*>(a.dense) + r * a.ld;
    T* v = vals + a.ptr[r];
#if ST_VECTOR_BYTES == 64  // the AVX-512 translation unit (its #pragma target does not define __AVX512F__)
    constexpr int64_t L = 64 / sizeof(T);
    int64_t c = 0;
    for (; c + 64 <= a.K; c += 64) {  // whole words, as in expand_rows
      const uint64_t word = bits[c >> 6];
      if (!word) continue;
      T* vk = v;
#pragma GCC unroll 8
      for (int k = 0; k < 64 / L; ++k) {
        const uint32_t m = static_cast<uint32_t>(word >> (k * L)) & (L == 16 ? 0xFFFFu : 0xFFu);
        const int cnt = __builtin_popcount(m);
        if constexpr (sizeof(T) == 4) {
          const __m512 x = _mm512_loadu_ps(src + c + k * L);
          _mm512_mask_storeu_ps(vk, static_cast<__mmask16>((1u << cnt) - 1u), _mm512_maskz_compress_ps(static_cast<__mmask16>(m), x));
        } else {
          const __m512d x = _mm512_loadu_pd(src + c + k * L);
          _mm512_mask_storeu_pd(vk, static_cast<__mmask8>((1u << cnt) - 1u), _mm512_maskz_compress_pd(static_cast<__mmask8>(m), x));
        }
        vk += cnt;
      }
      v += __builtin_popcountll(word);
    }
    for (; c < a.K; c += L) {
      const int64_t n = a.K - c < L ? a.K - c : L;
      const uint32_t lanes = n == L ? (L == 16 ? 0xFFFFu : 0xFFu) : ((1u << n) - 1u);
      const uint32_t m = static_cast<uint32_t>(bits[c >> 6] >> (c & 63)) & lanes;
      if (!m) continue;
      const int cnt = __builtin_popcount(m);
      if constexpr (sizeof(T) == 4) {
        const __m512 x = _mm512_maskz_loadu_ps(static_cast<__mmask16>(lanes), src + c);
        _mm512_mask_storeu_ps(v, static_cast<__mmask16>((1u << cnt) - 1u), _mm512_maskz_compress_ps(static_cast<__mmask16>(m), x));
      } else {
        const __m512d x = _mm512_maskz_loadu_pd(static_cast<__mmask8>(lanes), src + c);
        _mm512_mask_storeu_pd(v, static_cast<__mmask8>((1u << cnt) - 1u), _mm512_maskz_compress_pd(static_cast<__mmask8>(m), x));
      }
      v += cnt;
    }
#elif ST_VECTOR_BYTES == 32
    compress_row_avx2<T>(bits, a.K, src, v, vals + a.ptr[r1]);
#else
    for (int64_t c = 0; c < a.K; ++c) {
      if ((bits[c >> 6] >> (c & 63)) & 1u) *v++ = src[c];
    }
#endif
  }
}

// ----------------------------------------------------------------------------- row-subset weight gradient
//
// gW[r, :] = sum_b gy[b, r] x[b, :] for the active rows only, written straight into the
// output (no product buffer, no second pass over the rows). A tile of kRowGemmTile active
// rows by kRowGemmNV vectors of columns keeps its accumulators in registers for the whole
// batch: per batch entry the tile's x vectors are loaded once and each row's gradient
// value is broadcast against them; x's block of columns (B x NV vectors) is reused from
// L1/L2 by every tile. The last tile is padded with gyt's zero row and a scratch output,
// so the inner loop has no row count to test.

#if ST_VECTOR_BYTES == 64
constexpr int kRowGemmNV = 4, kRowGemmTile = 6;  // 24 accumulators + 4 x + 1 of 32 registers
#else
constexpr int kRowGemmNV = 2, kRowGemmTile = 5;  // 10 accumulators + 2 x + 1 of 16 registers
#endif

template <typename T>
inline void rowgemm_tile(const T* const* g, const T* __restrict x, int64_t ldx, int64_t B, T* const* o) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  constexpr int NV = kRowGemmNV;
  V acc[kRowGemmTile][NV];
#pragma GCC unroll 8
  for (int i = 0; i < kRowGemmTile; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  for (int64_t b = 0; b < B; ++b) {
    const T* __restrict xr = x + b * ldx;
    V xv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) xv[v] = vload(xr + v * L);
#pragma GCC unroll 8
    for (int i = 0; i < kRowGemmTile; ++i) {
      const T gi = g[i][b];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] += gi * xv[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kRowGemmTile; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(o[i] + v * L, acc[i][v]);
}

// Fewer than kRowGemmNV vectors of columns left: whole vectors one at a time; the last
// partial vector reads `xpad` (those columns of x, zero-padded to a vector per batch
// entry, built once per call) and stores only its nc % L lanes.
template <typename T>
inline void rowgemm_tile_tail(const T* const* g, const T* __restrict x, int64_t ldx, int64_t B, T* const* o,
                              int64_t nc, const T* __restrict xpad) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  int64_t c = 0;
  for (; c + L <= nc; c += L) {
    V acc[kRowGemmTile];
    for (int i = 0; i < kRowGemmTile; ++i) acc[i] = V{};
    for (int64_t b = 0; b < B; ++b) {
      const V xv = vload(x + b * ldx + c);
      for (int i = 0; i < kRowGemmTile; ++i) acc[i] += g[i][b] * xv;
    }
    for (int i = 0; i < kRowGemmTile; ++i) vstore(o[i] + c, acc[i]);
  }
  if (c == nc) return;
  V acc[kRowGemmTile];
  for (int i = 0; i < kRowGemmTile; ++i) acc[i] = V{};
  for (int64_t b = 0; b < B; ++b) {
    const V xv = vload(xpad + b * L);
    for (int i = 0; i < kRowGemmTile; ++i) acc[i] += g[i][b] * xv;
  }
  for (int i = 0; i < kRowGemmTile; ++i) __builtin_memcpy(o[i] + c, &acc[i], (nc - c) * sizeof(T));
}

// Columns [c_begin, c_end) of every output row.
template <typename T>
void rowgemm_kernel(const RowGemmArgs& a, int64_t c_begin, int64_t c_end) {
  constexpr int64_t W = kRowGemmNV * Vec<T>::L;  // columns per tile
  const T* gyt = static_cast<const T*>(a.gyt);
  const T* zero_row = static_cast<const T*>(a.zero);
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  alignas(64) T scratch[W];
  std::vector<T> xpad;  // the last partial vector's columns, zero-padded (see rowgemm_tile_tail)
  const int64_t rem = (c_end - c_begin) % Vec<T>::L;
  if (rem) {
    const int64_t cp = c_end - rem;
    xpad.assign(static_cast<std::size_t>(a.B) * Vec<T>::L, T(0));
    for (int64_t b = 0; b < a.B; ++b)
      for (int64_t c = 0; c < rem; ++c) xpad[b * Vec<T>::L + c] = x[b * a.ldx + cp + c];
  }
  // When x's rows are a multiple of 512 bytes apart (I = 1024: 4 KB), a tile's B rows read
  // in place fall into a few cache sets and the block is evicted between row tiles
  // (256x1024x1024 at half the rows frozen, AVX2: as slow as the dense gradient); then each
  // full tile's columns are first copied into a contiguous [B][W] block, just before the
  // tile's row tiles use it. Other strides read x in place (the copy cost 3-7% at LeNet's
  // sizes).
  const bool aliased = (a.ldx * static_cast<int64_t>(sizeof(T))) % 512 == 0;
  thread_local std::vector<T> xblock;
  if (aliased && static_cast<int64_t>(xblock.size()) < a.B * W) xblock.resize(a.B * W);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += W) {
    const int64_t nc = c_end - c0 < W ? c_end - c0 : W;
    const bool copy = aliased && nc == W;
    if (copy)
      for (int64_t b = 0; b < a.B; ++b) __builtin_memcpy(xblock.data() + b * W, x + b * a.ldx + c0, W * sizeof(T));
    const T* xt = copy ? xblock.data() : x + c0;
    const int64_t ldt = copy ? W : a.ldx;
    for (int64_t j = 0; j < a.k; j += kRowGemmTile) {
      const T* g[kRowGemmTile];
      T* o[kRowGemmTile];
      for (int i = 0; i < kRowGemmTile; ++i) {
        const bool real = j + i < a.k;
        g[i] = real ? gyt + (j + i) * a.ldg : zero_row;
        o[i] = real ? out + a.rows[j + i] * a.ldo + c0 : scratch;
      }
      if (nc == W)
        rowgemm_tile<T>(g, xt, ldt, a.B, o);
      else
        rowgemm_tile_tail<T>(g, x + c0, a.ldx, a.B, o, nc, xpad.data());
    }
  }
  if (xblock.size() * sizeof(T) > (std::size_t(4) << 20)) std::vector<T>().swap(xblock);  // a huge batch's block is not kept
  for (int64_t i = 0; i < a.n_frozen; ++i)
    __builtin_memset(out + a.frozen[i] * a.ldo + c_begin, 0, (c_end - c_begin) * sizeof(T));
}

// ----------------------------------------------------------------------------- SDDMM by dense tiles
//
// out[e] = src[idx[e]] for e in [e0, e1): a kept row's entries out of its dense row
template <typename T>
inline void gather_entries(const T* __restrict src, const int32_t* __restrict idx, int64_t e0, int64_t e1,
                           T* __restrict out) {
  int64_t e = e0;
#if ST_VECTOR_BYTES == 64
  if (sizeof(T) == 4) {
    for (; e + 16 <= e1; e += 16) {
      const __m512i vi = _mm512_loadu_si512(idx + e);
      _mm512_storeu_ps(reinterpret_cast<float*>(out + e),
                       _mm512_i32gather_ps(vi, reinterpret_cast<const float*>(src), 4));
    }
  } else {
    for (; e + 8 <= e1; e += 8) {
      const __m256i vi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + e));
      _mm512_storeu_pd(reinterpret_cast<double*>(out + e),
                       _mm512_i32gather_pd(vi, reinterpret_cast<const double*>(src), 8));
    }
  }
#endif
  for (; e < e1; ++e) out[e] = src[idx[e]];
}

// (kernels.h, sddmm_tile) Rows [r_begin, r_end): their active rows with entries go
// kTileGroupRows at a time through the row-subset tiles into a scratch block of dense
// rows, column block by column block (a block of x is then reused from L1 by every tile
// of the group, as in rowgemm_kernel), then each row's kept entries are gathered from the
// block. Frozen rows' entries are 0. Unlike rowgemm_kernel, x rows 512 bytes apart are
// read in place: copying their blocks cost 4-10% (64x256x256, 64x6272x256). The group size
// mattered little (60x784x300, 2 threads, groups of 6 / 12 / 24 / 48 rows at 51% density:
// 141 / 133 / 134 / 131 us).
constexpr int64_t kTileGroupRows = 8 * kRowGemmTile;

template <typename T>
void sddmm_tile_kernel(const SddmmArgs& s, int64_t r_begin, int64_t r_end) {
  constexpr int64_t W = kRowGemmNV * Vec<T>::L;  // columns per tile
  const int32_t* __restrict ptr = s.ptr;
  const int32_t* __restrict idx = s.idx;
  const T* A = static_cast<const T*>(s.a);
  const T* x = static_cast<const T*>(s.x);
  const T* zero_row = static_cast<const T*>(s.zero_row);
  T* __restrict out = static_cast<T*>(s.out);
  const int64_t K = s.K, B = s.B, ldx = s.ldx;
  const int64_t ldo = (K + W - 1) / W * W;  // scratch row stride: whole tiles
  thread_local std::vector<T> scratch;       // kTileGroupRows dense rows, then the padding rows' row
  if (static_cast<int64_t>(scratch.size()) < (kTileGroupRows + 1) * ldo) scratch.resize((kTileGroupRows + 1) * ldo);
  T* pad_out = scratch.data() + kTileGroupRows * ldo;
  std::vector<T> xpad;  // the last partial vector's columns, zero-padded (rowgemm_tile_tail)
  const int64_t rem = K % Vec<T>::L;
  if (rem) {
    xpad.assign(static_cast<std::size_t>(B) * Vec<T>::L, T(0));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < rem; ++c) xpad[b * Vec<T>::L + c] = x[b * ldx + K - rem + c];
  }
  int64_t rows[kTileGroupRows];
  int64_t r = r_begin;
  while (r < r_end) {
    int64_t n = 0;  // the next group
    for (; r < r_end && n < kTileGroupRows; ++r) {
      if (ptr[r + 1] == ptr[r]) continue;
      if (s.active && !s.active[r]) {
        for (int64_t e = ptr[r]; e < ptr[r + 1]; ++e) out[e] = T(0);
        continue;
      }
      rows[n++] = r;
    }
    if (n == 0) break;
    for (int64_t c0 = 0; c0 < K; c0 += W) {
      const int64_t nc = K - c0 < W ? K - c0 : W;
      for (int64_t j = 0; j < n; j += kRowGemmTile) {
        const T* g[kRowGemmTile];
        T* o[kRowGemmTile];
        for (int i = 0; i < kRowGemmTile; ++i) {
          const bool real = j + i < n;
          g[i] = real ? A + rows[j + i] * s.ld : zero_row;
          o[i] = (real ? scratch.data() + (j + i) * ldo : pad_out) + c0;
        }
        if (nc == W)
          rowgemm_tile<T>(g, x + c0, ldx, B, o);
        else
          rowgemm_tile_tail<T>(g, x + c0, ldx, B, o, nc, xpad.data());
      }
    }
    for (int64_t j = 0; j < n; ++j)
      gather_entries<T>(scratch.data() + j * ldo, idx, ptr[rows[j]], ptr[rows[j] + 1], out);
  }
  if (scratch.size() * sizeof(T) > (std::size_t(4) << 20)) std::vector<T>().swap(scratch);
}

}  // namespace

// (kernels.h, ReluGradFn) `omp simd` makes the select a blend, not a branch (ReLU signs
// are a coin flip: a branch mispredicts on half the entries). In the baseline glue it
// compiled to SSE2; here to the ISA's vectors.
template <typename T>
void relu_grad_rows(const void* gv, const void* yv, void* outv, void* sumv, int64_t B, int64_t O) {
  const T* __restrict G = static_cast<const T*>(gv);
  const T* __restrict Y = static_cast<const T*>(yv);
  T* __restrict out = static_cast<T*>(outv);
  T* __restrict sum = static_cast<T*>(sumv);
  for (int64_t b = 0; b < B; ++b) {
    const T* __restrict grow = G + b * O;
    if (Y) {
      const T* __restrict yrow = Y + b * O;
      T* __restrict orow = out + b * O;
#pragma omp simd
      for (int64_t o = 0; o < O; ++o) {
        const T g = grow[o];  // loaded unconditionally: a conditional load does not vectorise on SSE2
        const T v = yrow[o] <= 0 ? T(0) : g;  // a NaN y passes gy, as threshold_backward
        orow[o] = v;
        sum[o] += v;
      }
    } else {
#pragma omp simd
      for (int64_t o = 0; o < O; ++o) sum[o] += grow[o];
    }
  }
}

void index_range(const int32_t* __restrict ix, int64_t n, int32_t* lo_out, int32_t* hi_out) {
  int32_t lo = ix[0], hi = ix[0];
#pragma omp simd reduction(min : lo) reduction(max : hi)
  for (int64_t i = 0; i < n; ++i) {
    lo = ix[i] < lo ? ix[i] : lo;
    hi = ix[i] > hi ? ix[i] : hi;
  }
  *lo_out = lo;
  *hi_out = hi;
}

int64_t decreases(const int32_t* __restrict p, int64_t R) {
  int32_t bad = 0;  // counted, not searched: the loop vectorises; the caller finds the first one
#pragma omp simd reduction(+ : bad)
  for (int64_t r = 0; r < R; ++r) bad += p[r + 1] < p[r] ? 1 : 0;
  return bad;
}

KernelTable make_table() {
  KernelTable t{};
  t.index_range = &index_range;
  t.decreases = &decreases;
  t.relu_grad_f32 = &relu_grad_rows<float>;
  t.relu_grad_f64 = &relu_grad_rows<double>;
  t.expand_f32 = expand_rows<float>;
  t.expand_f64 = expand_rows<double>;
  t.compress_f32 = compress_rows<float>;
  t.compress_f64 = compress_rows<double>;
  t.isa = ST_ISA_NAME;
  t.vector_bytes = ST_VECTOR_BYTES;
  t.spmm_f32[0] = &spmm_kernel<float, 1>;
  t.spmm_f32[1] = &spmm_kernel<float, 2>;
  t.spmm_f32[2] = &spmm_kernel<float, 4>;
  t.spmm_f32[3] = &spmm_kernel<float, 8>;
  t.spmm_f64[0] = &spmm_kernel<double, 1>;
  t.spmm_f64[1] = &spmm_kernel<double, 2>;
  t.spmm_f64[2] = &spmm_kernel<double, 4>;
  t.spmm_f64[3] = &spmm_kernel<double, 8>;
  t.sddmm_f32 = &sddmm_kernel<float>;
  t.sddmm_f64 = &sddmm_kernel<double>;
  t.rowgemm_f32 = &rowgemm_kernel<float>;
  t.rowgemm_f64 = &rowgemm_kernel<double>;
  t.sddmm_tile_f32 = &sddmm_tile_kernel<float>;
  t.sddmm_tile_f64 = &sddmm_tile_kernel<double>;
  t.sgd_f32 = &sgd_kernel<float>;
  t.sgd_f64 = &sgd_kernel<double>;
  t.adamw_f32 = &adamw_kernel<float>;
  t.adamw_f64 = &adamw_kernel<double>;
  t.pack_f32 = &pack_kernel<float>;
  t.pack_f64 = &pack_kernel<double>;
  return t;
}

}  // namespace ST_ISA
}  // namespace cpu
}  // namespace sparseticket
