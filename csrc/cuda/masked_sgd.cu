// Fused multi-tensor masked SGD: one launch updates every parameter of a dtype.
//
// The glue copies a table of MaskedSgdTensor (addresses, sizes, mask layout) and a table of
// chunks (tensor, first element) to the device; block c streams chunk c: parameter, gradient
// and momentum buffer are read once and written once, masks read as bytes. The update is
// torch.optim.SGD's, operation for operation:
//   d = maximize ? -g : g;   d = d + wd * p
//   buf = fresh ? d : momentum * buf + (1 - dampening) * d
//   d = nesterov ? d + momentum * buf : buf;   p = p - lr * d
// with fma() exactly where ATen's CUDA kernels compute `a + alpha * b` (nvcc contracts those
// to an FMA) and every scalar rounded to T once, as ATen does for alpha. Pruned elements
// (keep == 0) get p = buf = 0; frozen elements (active == 0) are neither read nor written,
// so their bits cannot change.
#include <cuda_runtime.h>

#include <cstdint>

#include "gpu_kernels.h"

namespace sparseticket {
namespace gpu {
namespace {

constexpr int kThreads = 256;

// Row of element i among the rows of row_ptr: the last r with row_ptr[r] <= i.
__device__ __forceinline__ int64_t csr_row_of(const int32_t* row_ptr, int64_t n_rows, int64_t i) {
  int64_t lo = 0, hi = n_rows;  // row_ptr[lo] <= i < row_ptr[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    if (row_ptr[mid] <= i) lo = mid; else hi = mid;
  }
  return lo;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) masked_sgd_kernel(const MaskedSgdParams<T> p) {
  const T neg_lr = -static_cast<T>(p.lr);
  const T momentum = static_cast<T>(p.momentum);
  const T damp_c = static_cast<T>(1.0 - p.dampening);
  const T wd = static_cast<T>(p.weight_decay);
  const bool use_momentum = p.momentum != 0.0;
  const bool use_wd = p.weight_decay != 0.0;

  for (int64_t c = blockIdx.x; c < p.n_chunks; c += gridDim.x) {
    const MaskedChunk chunk = p.chunks[c];
    const MaskedSgdTensor<T> t = p.tensors[chunk.tensor];
    const int64_t first = chunk.start + threadIdx.x;
    const int64_t end = min(chunk.start + p.chunk_size, t.numel);
    // CSR rows: search once for this thread's first element, then walk forward
    int64_t row = 0;
    if (t.mode == kActiveCsrRow && first < end) row = csr_row_of(t.row_ptr, t.n_rows, first);

    for (int64_t i = first; i < end; i += kThreads) {
      bool live = true;
      switch (t.mode) {
        case kActiveElement: live = t.active[i] != 0; break;
        case kActiveRow: live = t.active[i / t.row_len] != 0; break;
        case kActiveCsrRow:
          while (row + 1 < t.n_rows && t.row_ptr[row + 1] <= i) ++row;
          live = t.active[row] != 0;
          break;
        default: break;
      }
      if (!live) continue;

      const T g = t.grad[i];
      T x = t.param[i];
      T d = p.maximize ? -g : g;
      if (use_wd) d = fma(wd, x, d);
      T buf = T(0);
      if (use_momentum) {
        buf = t.fresh ? d : fma(damp_c, d, t.momentum_buffer[i] * momentum);
        d = p.nesterov ? fma(momentum, buf, d) : buf;
      }
      x = fma(neg_lr, d, x);
      if (t.keep && !t.keep[i]) {
        x = T(0);
        buf = T(0);
      }
      t.param[i] = x;
      if (use_momentum) t.momentum_buffer[i] = buf;
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_masked_sgd(const MaskedSgdParams<T>& p, cudaStream_t stream) {
  if (p.n_chunks <= 0) return cudaSuccess;
  // one block per chunk up to the grid limit; the kernel strides over any remainder
  const int64_t blocks = p.n_chunks < 2147483647 ? p.n_chunks : 2147483647;
  masked_sgd_kernel<T><<<dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t launch_masked_sgd<float>(const MaskedSgdParams<float>&, cudaStream_t);
template cudaError_t launch_masked_sgd<double>(const MaskedSgdParams<double>&, cudaStream_t);

}  // namespace gpu
}  // namespace sparseticket
