// Row-split CSR x dense product (Gale et al., "Sparse GPU Kernels for Deep Learning", SC'20):
// one warp per sparse row and per tile of 32 * kPerLane batch columns.
//
// The warp loads 32 (index, value) pairs of its row with one coalesced access, then
// broadcasts them lane to lane with shuffles (no shared memory, no block barrier) while every
// lane streams its batch columns of the selected dense rows: each dense-row access is 32
// consecutive elements, fully coalesced. Rows are scheduled longest first when a row order is
// given (Gale et al.'s row swizzle), which balances the tail of the grid. Consecutive blocks
// work on the same batch tile, so the dense rows they gather are shared through L2.
#include <cuda_runtime.h>

#include <cstdint>

#include "gpu_kernels.h"

namespace sparseticket {
namespace gpu {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;

template <typename T, int kPerLane>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    csr_dense_rowsplit_kernel(const CsrDenseParams<T> p) {
  const int lane = threadIdx.x & 31;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (slot >= p.n_rows) return;  // whole warp leaves together: shuffles below stay full-mask
  const int32_t r = p.row_order ? p.row_order[slot] : static_cast<int32_t>(slot);
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * (32 * kPerLane) + lane;

  bool in_batch[kPerLane];
  T acc[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    in_batch[e] = b0 + 32 * e < p.batch;
    acc[e] = T(0);
  }

  const int32_t start = max(p.ptr[r], 0);
  const int32_t end = min(p.ptr[r + 1], p.nnz);
  for (int32_t k0 = start; k0 < end; k0 += 32) {
    const int32_t k = k0 + lane;
    int32_t my_idx = 0;
    T my_val = T(0);
    if (k < end) {
      my_idx = p.idx[k];
      const int32_t src = p.perm ? p.perm[k] : k;
      if (my_idx < 0 || my_idx >= p.n_cols || src < 0 || src >= p.nnz) {
        my_idx = -1;  // outside the operand: skipped below, nothing is read out of bounds
      } else {
        my_val = p.values[src];
      }
    }
    const int n = min(32, end - k0);
#pragma unroll 4
    for (int j = 0; j < n; ++j) {
      const int32_t i = __shfl_sync(kFullMask, my_idx, j);
      const T v = __shfl_sync(kFullMask, my_val, j);
      if (i < 0) continue;  // same i for the whole warp: no divergence
      const T* d = p.dense + static_cast<int64_t>(i) * p.dense_ld + b0;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        if (in_batch[e]) acc[e] = fma(v, __ldg(d + 32 * e), acc[e]);
      }
    }
  }

  const T bias = p.bias ? p.bias[r] : T(0);
  T* o = p.out + static_cast<int64_t>(r) * p.out_ld + b0;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    if (in_batch[e]) o[32 * e] = acc[e] + bias;
  }
}

template <typename T, int kPerLane>
cudaError_t launch(const CsrDenseParams<T>& p, cudaStream_t stream) {
  const dim3 block(kWarpsPerBlock * 32);
  const dim3 grid(static_cast<unsigned>((p.n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>((p.batch + 32 * kPerLane - 1) / (32 * kPerLane)));
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  csr_dense_rowsplit_kernel<T, kPerLane><<<grid, block, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_csr_dense_rowsplit(const CsrDenseParams<T>& p, cudaStream_t stream) {
  if (p.n_rows <= 0 || p.batch <= 0) return cudaSuccess;
  // Batch tile per warp: 4 columns per lane (128) once the batch is wide enough to fill it,
  // which gives each lane 4 independent loads in flight per broadcast entry.
  if (p.batch > 64) return launch<T, 4>(p, stream);
  if (p.batch > 32) return launch<T, 2>(p, stream);
  return launch<T, 1>(p, stream);
}

template cudaError_t launch_csr_dense_rowsplit<float>(const CsrDenseParams<float>&, cudaStream_t);
template cudaError_t launch_csr_dense_rowsplit<double>(const CsrDenseParams<double>&, cudaStream_t);

}  // namespace gpu
}  // namespace sparseticket
