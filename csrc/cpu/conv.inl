// Direct sparse convolution kernel core (see conv.h), written once and compiled per ISA
// like kernels.inl: the including file sets the target, ST_ISA, ST_ISA_NAME,
// ST_VECTOR_BYTES and ST_HAS_FMA. Torch-free; internal linkage except make_conv_table().

#include <cstdint>
#include <cstring>
#include <utility>

#include "conv.h"

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

template <typename T>
inline typename CVec<T>::type cload(const T* p) {
  typename CVec<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void cstore(T* p, typename CVec<T>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

template <typename T>
inline T csum(typename CVec<T>::type v) {
  constexpr int L = CVec<T>::L;
  T lanes[L];
  __builtin_memcpy(lanes, &v, sizeof(v));
#pragma GCC unroll 16
  for (int w = L / 2; w >= 1; w /= 2)
#pragma GCC unroll 16
    for (int i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  return lanes[0];
}

// 32 vector registers with AVX-512, 16 otherwise; a few stay free for the broadcast
// weight and addresses.
constexpr int kAccBudget = ST_VECTOR_BYTES == 64 ? 28 : 12;

// ----------------------------------------------------------------------------- packing

template <typename T>
void pack_planes(const void* srcv, int64_t C, int64_t H, int64_t W, int64_t top, int64_t left, int64_t step,
                 int64_t rows, int64_t cols, void* dstv) {
  const T* __restrict src = static_cast<const T*>(srcv);
  T* __restrict dst = static_cast<T*>(dstv);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t b = 0; b < step; ++b)
      for (int64_t r = 0; r < rows; ++r) {
        T* __restrict d = dst + ((c * step + b) * rows + r) * cols;
        const int64_t h = r - top;
        if (h < 0 || h >= H) {
          std::memset(d, 0, sizeof(T) * cols);
          continue;
        }
        const T* __restrict s = src + (c * H + h) * W;
        if (step == 1) {
          const int64_t q0 = left < cols ? left : cols;
          const int64_t q1 = left + W < cols ? left + W : cols;
          if (q0 > 0) std::memset(d, 0, sizeof(T) * q0);
          if (q1 > q0) std::memcpy(d + q0, s + (q0 - left), sizeof(T) * (q1 - q0));
          if (cols > q1) std::memset(d + q1, 0, sizeof(T) * (cols - q1));
        } else {
          for (int64_t q = 0; q < cols; ++q) {
            const int64_t w = q * step + b - left;
            d[q] = (w >= 0 && w < W) ? s[w] : T(0);
          }
        }
      }
}

// ----------------------------------------------------------------------------- correlate
//
// Output-stationary: a tile of R rows x NV vectors of one output plane lives in
// registers while the plane's list streams past; each entry is one broadcast and R*NV
// FMAs whose input operand is a load at a fixed shift of the tile.

template <typename T, int NV, int R>
void correlate(const CorrArgs& a, int64_t l0, int64_t l1) {
  using V = typename CVec<T>::type;
  constexpr int L = CVec<T>::L;
  constexpr int TW = NV * L;
  const T* __restrict in = static_cast<const T*>(a.in);
  const int32_t* __restrict ptr = a.ptr;
  const int32_t* __restrict off = a.off;
  const T* __restrict val = static_cast<const T*>(a.val);
  const T* __restrict bias = static_cast<const T*>(a.bias);
  T* __restrict out = static_cast<T*>(a.out);
  const int64_t in_row = a.in_row;

  for (int64_t l = l0; l < l1; ++l) {
    const T b = bias ? bias[l] : T(0);
    const int64_t e0 = ptr[l], e1 = ptr[l + 1];
    T* __restrict o = out + l * a.out_plane;
    for (int64_t r0 = 0; r0 < a.rows; r0 += R) {
      for (int64_t ct = 0; ct < a.col_tiles; ++ct) {
        const T* __restrict base = in + r0 * in_row + ct * TW;
        V acc[R][NV];
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[r][v] = V{} + b;
        for (int64_t e = e0; e < e1; ++e) {
          const T w = val[e];
          const T* __restrict p = base + off[e];
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[r][v] += w * cload(p + v * L);
            p += in_row;
          }
        }
        const int64_t nr = a.rows - r0 < R ? a.rows - r0 : R;
        const int64_t c0 = ct * TW;
        const int64_t nc = a.cols - c0 < TW ? a.cols - c0 : TW;
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          if (r >= nr) break;
          T* __restrict d = o + (r0 + r) * a.ldo + c0;
          if (nc == TW) {
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) cstore(d + v * L, acc[r][v]);
          } else {
            alignas(64) T tmp[TW];
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) cstore(tmp + v * L, acc[r][v]);
            std::memcpy(d, tmp, sizeof(T) * nc);
          }
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------- dots
//
// Kept-weight gradient of one image: out[e] += <gy plane of the entry's list, input
// shifted by off[e]>. Four entries of a list share each load of gy; two accumulators
// per entry (even/odd vectors of a row) keep eight FMA chains in flight.

template <typename T>
void dots(const DotArgs& a, int64_t l0, int64_t l1) {
  using V = typename CVec<T>::type;
  constexpr int L = CVec<T>::L;
  const T* __restrict X = static_cast<const T*>(a.x);
  const T* __restrict G = static_cast<const T*>(a.g);
  const int32_t* __restrict ptr = a.ptr;
  const int32_t* __restrict off = a.off;
  T* __restrict out = static_cast<T*>(a.out);
  const int64_t width = a.width, rows = a.rows, x_row = a.x_row;
  const int64_t w2 = width / (2 * L) * (2 * L);

  for (int64_t l = l0; l < l1; ++l) {
    if (a.active && !a.active[l]) continue;
    const T* __restrict g = G + l * a.g_plane;
    int64_t e = ptr[l];
    const int64_t e1 = ptr[l + 1];
    for (; e + 4 <= e1; e += 4) {
      const T* __restrict x0 = X + off[e];
      const T* __restrict x1 = X + off[e + 1];
      const T* __restrict x2 = X + off[e + 2];
      const T* __restrict x3 = X + off[e + 3];
      V a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
      for (int64_t r = 0; r < rows; ++r) {
        const T* __restrict gr = g + r * width;
        const int64_t xo = r * x_row;
        int64_t q = 0;
        for (; q < w2; q += 2 * L) {
          const V g0 = cload(gr + q), g1 = cload(gr + q + L);
          a0 += g0 * cload(x0 + xo + q);
          a1 += g0 * cload(x1 + xo + q);
          a2 += g0 * cload(x2 + xo + q);
          a3 += g0 * cload(x3 + xo + q);
          b0 += g1 * cload(x0 + xo + q + L);
          b1 += g1 * cload(x1 + xo + q + L);
          b2 += g1 * cload(x2 + xo + q + L);
          b3 += g1 * cload(x3 + xo + q + L);
        }
        for (; q < width; q += L) {
          const V g0 = cload(gr + q);
          a0 += g0 * cload(x0 + xo + q);
          a1 += g0 * cload(x1 + xo + q);
          a2 += g0 * cload(x2 + xo + q);
          a3 += g0 * cload(x3 + xo + q);
        }
      }
      out[e] += csum<T>(a0 + b0);
      out[e + 1] += csum<T>(a1 + b1);
      out[e + 2] += csum<T>(a2 + b2);
      out[e + 3] += csum<T>(a3 + b3);
    }
    for (; e < e1; ++e) {
      const T* __restrict x0 = X + off[e];
      V a0{}, b0{};
      for (int64_t r = 0; r < rows; ++r) {
        const T* __restrict gr = g + r * width;
        const int64_t xo = r * x_row;
        int64_t q = 0;
        for (; q < w2; q += 2 * L) {
          a0 += cload(gr + q) * cload(x0 + xo + q);
          b0 += cload(gr + q + L) * cload(x0 + xo + q + L);
        }
        for (; q < width; q += L) a0 += cload(gr + q) * cload(x0 + xo + q);
      }
      out[e] += csum<T>(a0 + b0);
    }
  }
}

template <typename T, int NV, int RI>
constexpr CorrFn corr_entry() {
  if constexpr (NV * kRows[RI] <= kAccBudget)
    return &correlate<T, NV, kRows[RI]>;
  else
    return nullptr;
}

template <typename T, int NV, int... RI>
void fill_rows(CorrFn* dst, std::integer_sequence<int, RI...>) {
  ((dst[RI] = corr_entry<T, NV, RI>()), ...);
}

template <typename T>
void fill_corr(CorrFn (*dst)[kRowChoices]) {
  using Seq = std::make_integer_sequence<int, kRowChoices>;
  fill_rows<T, 1>(dst[0], Seq{});
  fill_rows<T, 2>(dst[1], Seq{});
  fill_rows<T, 3>(dst[2], Seq{});
  fill_rows<T, 4>(dst[3], Seq{});
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
  t.dot_f32 = &dots<float>;
  t.dot_f64 = &dots<double>;
  t.pack_f32 = &pack_planes<float>;
  t.pack_f64 = &pack_planes<double>;
  return t;
}

}  // namespace ST_ISA
}  // namespace cpu
}  // namespace sparseticket
