// sparseticket CUDA kernels: the torch-free core.
//
// Plain parameter structs (pointers, sizes, leading dimensions) and launchers, templated on
// the element type (float, double) and explicitly instantiated in the .cu files. This header
// includes only CUDA's runtime API and <cstdint>, so the .cu files compile with nvcc on any
// machine (CI: .ci/nvcc_check.sh, sm_80 and sm_90); the ATen glue (ops_cuda.cpp) fills the
// structs from tensors and is compiled only against a CUDA build of torch.
//
// Conventions: dense operands are "batch contiguous": element (f, b) of a [F, B] operand is
// at ptr[f * ld + b]. Masks are bytes (torch.bool storage), nonzero = true. All index arrays
// are int32, as in the ticket format (sparseticket/ops/reference.py).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sparseticket {
namespace gpu {

// ----------------------------------------------------------------------------- SpMM

// out[r, b] = sum_{k in ptr[r] .. ptr[r+1]} values[perm ? perm[k] : k] * dense[idx[k], b]  (+ bias[r])
//
// Forward (y = x W^T + b): CSR of W, dense = x^T, out = y^T.
// Input gradient (gx = gy W): CSC of W with perm, dense = gy^T, out = gx^T.
template <typename T>
struct CsrDenseParams {
  const T* dense;             // [n_cols, batch], batch contiguous
  int64_t dense_ld;
  const T* values;            // [nnz]
  const int32_t* perm;        // [nnz] or nullptr: values are read through perm (CSC of a CSR ticket)
  const int32_t* ptr;         // [n_rows + 1]
  const int32_t* idx;         // [nnz]
  const int32_t* row_order;   // [n_rows] or nullptr: order in which rows are scheduled (longest first)
  const T* bias;              // [n_rows] or nullptr
  T* out;                     // [n_rows, batch], batch contiguous
  int64_t out_ld;
  int32_t n_rows;
  int32_t batch;
  int32_t nnz;                // entries past nnz, or indices outside [0, n_cols), are skipped:
  int32_t n_cols;             // the kernel never reads out of bounds whatever the ticket holds
};

template <typename T>
cudaError_t launch_csr_dense_rowsplit(const CsrDenseParams<T>& p, cudaStream_t stream);

// ----------------------------------------------------------------------------- SDDMM

// out[k] = sum_b gy[row_k, b] * x[col_k, b] for every entry k of a CSR ticket; entries of rows
// with active[row] == 0 are written as 0 and never computed.
template <typename T>
struct SddmmParams {
  const T* gy;                // [n_rows, batch] (gy^T), batch contiguous
  int64_t gy_ld;
  const T* x;                 // [n_cols, batch] (x^T), batch contiguous
  int64_t x_ld;
  const int32_t* crow;        // [n_rows + 1]
  const int32_t* col;         // [nnz]
  const uint8_t* active;      // [n_rows] or nullptr (all active)
  const int32_t* row_order;   // [n_rows] or nullptr
  T* out;                     // [nnz]
  int32_t n_rows;
  int32_t batch;
  int32_t n_cols;             // columns outside [0, n_cols) give 0 instead of an out-of-bounds read
  int32_t nnz;                // row pointers are clamped to [0, nnz]
};

template <typename T>
cudaError_t launch_sddmm(const SddmmParams<T>& p, cudaStream_t stream);

// ----------------------------------------------------------------------------- masked SGD

enum ActiveMode : int32_t {
  kActiveNone = 0,     // every element is updated
  kActiveElement = 1,  // active[i]
  kActiveRow = 2,      // active[i / row_len]  (per neuron of a dense weight, or a bias)
  kActiveCsrRow = 3,   // active[r] for row_ptr[r] <= i < row_ptr[r+1]  (compact ticket values)
};

// One parameter of a fused step. 64-bit fields only, so host compiler and nvcc agree on the
// layout of the table the glue copies to the device.
template <typename T>
struct MaskedSgdTensor {
  T* param;                   // [numel], contiguous
  const T* grad;              // [numel]
  T* momentum_buffer;         // [numel] or nullptr when momentum == 0
  const uint8_t* keep;        // [numel] or nullptr
  const uint8_t* active;      // see mode
  const int32_t* row_ptr;     // [n_rows + 1] for kActiveCsrRow
  int64_t numel;
  int64_t row_len;            // kActiveRow: elements per row
  int64_t n_rows;             // kActiveCsrRow: rows in row_ptr
  int64_t mode;               // ActiveMode
  int64_t fresh;              // 1: the buffer is created by this step (torch.optim's first step)
  int64_t reserved;
};

struct MaskedChunk {
  int64_t tensor;             // index into the tensor table
  int64_t start;              // first element of the chunk
};

template <typename T>
struct MaskedSgdParams {
  const MaskedSgdTensor<T>* tensors;  // device table
  const MaskedChunk* chunks;          // device table
  int64_t n_chunks;
  int64_t chunk_size;                 // elements per chunk (kMaskedChunk)
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

// Elements per chunk: one thread block streams one chunk.
constexpr int64_t kMaskedChunk = 4096;

template <typename T>
cudaError_t launch_masked_sgd(const MaskedSgdParams<T>& p, cudaStream_t stream);

}  // namespace gpu
}  // namespace sparseticket
