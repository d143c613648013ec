// SDDMM for the kept-weight gradient, with frozen-row skipping:
//   out[k] = sum_b gy[row_k, b] * x[col_k, b]
//
// One thread block per sparse row (longest rows first when a row order is given); its warps
// take 32-entry chunks of the row in turn. For a chunk, lane j owns entry j: the warp walks
// the batch in tiles of 32 * kPerLane, each lane holding its columns of the row's gy in
// registers and accumulating, for all 32 entries, a partial dot product with the entries' x
// rows (coalesced loads: one x row per entry, 32 consecutive batch columns per access). The
// 32 partial sums are reduced across lanes once per chunk, not once per tile. A frozen row
// (active[row] == 0) writes zeros and does nothing else.
#include <cuda_runtime.h>

#include <cstdint>

#include "gpu_kernels.h"

namespace sparseticket {
namespace gpu {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename T, int kPerLane>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) sddmm_kernel(const SddmmParams<T> p) {
  const int32_t r = p.row_order ? p.row_order[blockIdx.x] : static_cast<int32_t>(blockIdx.x);
  const int32_t start = max(p.crow[r], 0);
  const int32_t end = min(p.crow[r + 1], p.nnz);
  if (p.active && !p.active[r]) {
    for (int32_t k = start + threadIdx.x; k < end; k += blockDim.x) p.out[k] = T(0);
    return;
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const T* g_row = p.gy + static_cast<int64_t>(r) * p.gy_ld;

  for (int32_t k0 = start + 32 * warp; k0 < end; k0 += 32 * kWarpsPerBlock) {
    const int n = min(32, end - k0);
    int32_t my_col = lane < n ? p.col[k0 + lane] : 0;
    const bool my_ok = my_col >= 0 && my_col < p.n_cols;
    if (!my_ok) my_col = 0;
    // entries to compute: in the chunk and inside x (an out-of-range column is never read)
    const unsigned live = __ballot_sync(kFullMask, lane < n && my_ok);
    const T* x_row[32];
    T part[32];
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      x_row[j] = p.x + static_cast<int64_t>(__shfl_sync(kFullMask, my_col, j)) * p.x_ld;
      part[j] = T(0);
    }
    for (int64_t b0 = lane; b0 < p.batch; b0 += 32 * kPerLane) {
      T g[kPerLane];
      bool in_batch[kPerLane];
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        in_batch[e] = b0 + 32 * e < p.batch;
        g[e] = in_batch[e] ? __ldg(g_row + b0 + 32 * e) : T(0);
      }
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        if ((live >> j) & 1u) {  // uniform over the warp: padding of a short chunk is skipped
          T s = part[j];
#pragma unroll
          for (int e = 0; e < kPerLane; ++e) {
            if (in_batch[e]) s = fma(g[e], __ldg(x_row[j] + b0 + 32 * e), s);
          }
          part[j] = s;
        }
      }
    }
    T mine = T(0);
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const T total = warp_sum(part[j]);
      if (lane == j) mine = total;
    }
    if (lane < n) p.out[k0 + lane] = my_ok ? mine : T(0);
  }
}

template <typename T, int kPerLane>
cudaError_t launch(const SddmmParams<T>& p, cudaStream_t stream) {
  sddmm_kernel<T, kPerLane><<<dim3(static_cast<unsigned>(p.n_rows)), dim3(kWarpsPerBlock * 32), 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_sddmm(const SddmmParams<T>& p, cudaStream_t stream) {
  if (p.n_rows <= 0) return cudaSuccess;
  // 2 batch columns per lane keeps 32 partials + 32 row pointers + the gy tile in registers
  // (about 130 for fp32) without spilling; 1 for fp64, whose partials take two registers each.
  if (sizeof(T) == 4 && p.batch > 32) return launch<T, 2>(p, stream);
  return launch<T, 1>(p, stream);
}

template cudaError_t launch_sddmm<float>(const SddmmParams<float>&, cudaStream_t);
template cudaError_t launch_sddmm<double>(const SddmmParams<double>&, cudaStream_t);

}  // namespace gpu
}  // namespace sparseticket
