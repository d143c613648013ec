// ATen glue for the CUDA kernels: argument checks, layouts, launches, registration.
//
// Compiled only when torch is a CUDA build (setup.py). The kernels themselves live in the
// torch-free .cu files (gpu_kernels.h); this file turns tensors into their parameter structs.
// Schemas are defined once, in sparseticket/ops/_library.py; error messages match the Python
// checks there, argument for argument.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "gpu_kernels.h"

namespace sparseticket {
namespace gpu {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;
using OptTensorList = c10::List<c10::optional<Tensor>>;

// ----------------------------------------------------------------------------- checks

void check_float(const Tensor& t, const std::string& name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "sparseticket: ", name,
              " must be float32 or float64, got ", t.scalar_type());
}
void check_dim(const Tensor& t, int64_t d, const std::string& name) {
  TORCH_CHECK(t.dim() == d, "sparseticket: ", name, " must be ", d, "-D, got shape ", t.sizes());
}
void check_same_device(const Tensor& t, const std::string& name, const Tensor& ref, const std::string& ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "sparseticket: ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}
void check_same_dtype(const Tensor& t, const std::string& name, const Tensor& ref, const std::string& ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "sparseticket: ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type());
}
void check_index(const Tensor& t, const std::string& name, const Tensor& ref, const std::string& ref_name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "sparseticket: ", name, " must be int32, got ", t.scalar_type());
  check_dim(t, 1, name);
  check_same_device(t, name, ref, ref_name);
}
void check_bool(const Tensor& t, const std::string& name) {
  TORCH_CHECK(t.scalar_type() == at::kBool, "sparseticket: ", name, " must be a torch.bool mask, got ",
              t.scalar_type());
}
void check_active(const OptTensor& active, int64_t n, const Tensor& ref) {
  if (!active) return;
  check_bool(*active, "active");
  check_dim(*active, 1, "active");
  TORCH_CHECK(active->size(0) == n, "sparseticket: active has ", active->size(0), " entries, expected out_features=",
              n);
  check_same_device(*active, "active", ref, "x");
}
void check_bias(const OptTensor& bias, int64_t n, const Tensor& x) {
  if (!bias) return;
  check_dim(*bias, 1, "bias");
  TORCH_CHECK(bias->size(0) == n, "sparseticket: bias has ", bias->size(0), " entries, expected out_features=", n);
  check_same_dtype(*bias, "bias", x, "x");
  check_same_device(*bias, "bias", x, "x");
}
// the kernels index with int32 (the ticket format); larger shapes are refused, not wrapped
void check_int32_range(int64_t v, const char* what) {
  TORCH_CHECK(v <= INT_MAX, "sparseticket: ", what, " = ", v, " exceeds the CUDA kernels' int32 range");
}

// x: [B, I] with a CSR ticket; returns O
int64_t check_spmm(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                   const OptTensor& bias) {
  check_float(x, "x");
  check_dim(x, 2, "x");
  check_dim(values, 1, "values");
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "sparseticket: values has dtype ", values.scalar_type(),
              " but x has ", x.scalar_type());
  check_index(crow, "crow", x, "x");
  check_index(col, "col", x, "x");
  check_same_device(values, "values", x, "x");
  TORCH_CHECK(crow.numel() >= 1, "sparseticket: crow must have O + 1 >= 1 entries");
  TORCH_CHECK(col.numel() == values.numel(), "sparseticket: col has ", col.numel(), " entries but values has ",
              values.numel());
  const int64_t O = crow.numel() - 1;
  check_bias(bias, O, x);
  return O;
}

// The CSR structure (ptr, idx) must address an operand with K rows. Same checks and messages
// as the CPU kernels, but reading the verdict needs the host (a sync per call), so on the GPU it
// runs only with SPARSETICKET_CHECK_INDICES=1. Without it the kernels still never read out of
// bounds: they skip out-of-range entries (gpu_kernels.h).
bool check_indices_enabled() {
  static const bool enabled = [] {
    const char* s = std::getenv("SPARSETICKET_CHECK_INDICES");
    return s != nullptr && std::string(s) != "" && std::string(s) != "0";
  }();
  return enabled;
}

void check_index_range(const Tensor& ptr, const Tensor& idx, int64_t K, const char* ptr_name, const char* idx_name,
                       const char* operand) {
  if (!check_indices_enabled()) return;
  const int64_t nnz = idx.numel();
  const int64_t first = ptr[0].item<int64_t>(), last = ptr[-1].item<int64_t>();
  TORCH_CHECK(first == 0 && last == nnz, "sparseticket: ", ptr_name, " must start at 0 and end at nnz=", nnz,
              ", got ", first, " and ", last);
  const Tensor lengths = ptr.slice(0, 1) - ptr.slice(0, 0, ptr.numel() - 1);
  const Tensor decreasing = (lengths < 0).nonzero();
  TORCH_CHECK(decreasing.numel() == 0, "sparseticket: row pointers of ", idx_name, " decrease at row ",
              decreasing.numel() ? decreasing[0][0].item<int64_t>() : 0);
  const Tensor rows = (lengths > 0).nonzero().flatten();
  if (rows.numel() == 0) return;
  const Tensor lo = idx.index_select(0, ptr.index_select(0, rows));
  const Tensor hi = idx.index_select(0, ptr.index_select(0, rows + 1) - 1);
  const Tensor bad = ((lo < 0) | (hi >= K)).nonzero();
  if (bad.numel() == 0) return;
  const int64_t k = bad[0][0].item<int64_t>();
  const int64_t l = lo[k].item<int64_t>(), h = hi[k].item<int64_t>();
  TORCH_CHECK(false, "sparseticket: ", idx_name, " has index ", l < 0 ? l : h, " in row ", rows[k].item<int64_t>(),
              " but ", operand, " has only ", K, " (is the ticket for a different in/out size?)");
}

// ----------------------------------------------------------------------------- layouts

// [B, F] -> [F, B] with the batch contiguous (a view when t is already column-major)
Tensor batch_major(const Tensor& t) {
  Tensor tt = t.t();
  return tt.stride(1) == 1 ? tt : tt.contiguous();
}

// Row indices sorted by decreasing length (Gale et al.'s row swizzle): long rows start first.
Tensor heavy_rows_first(const Tensor& ptr) {
  const Tensor lengths = ptr.slice(0, 1) - ptr.slice(0, 0, ptr.numel() - 1);
  return at::argsort(lengths, /*stable=*/true, /*dim=*/0, /*descending=*/true).to(at::kInt);
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// out [n_rows, B] (batch contiguous) of a CSR (values, ptr, idx[, perm]) times dense_t [n_cols, B]
Tensor rowsplit(const Tensor& dense_t, const Tensor& values, const OptTensor& perm, const Tensor& ptr,
                const Tensor& idx, const OptTensor& bias, int64_t n_rows, int64_t batch) {
  check_int32_range(n_rows, "rows");
  check_int32_range(batch, "batch");
  check_int32_range(values.numel(), "nnz");
  Tensor out_t = at::empty({n_rows, batch}, dense_t.options());
  const Tensor order = heavy_rows_first(ptr);
  const Tensor v = values.contiguous(), p = ptr.contiguous(), i = idx.contiguous();
  const Tensor pm = perm ? perm->contiguous() : Tensor();
  const Tensor b = bias ? bias->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(dense_t.scalar_type(), "sparseticket_csr_dense_rowsplit", [&] {
    CsrDenseParams<scalar_t> prm{};
    prm.dense = dense_t.data_ptr<scalar_t>();
    prm.dense_ld = dense_t.stride(0);
    prm.values = v.data_ptr<scalar_t>();
    prm.perm = pm.defined() ? pm.data_ptr<int32_t>() : nullptr;
    prm.ptr = p.data_ptr<int32_t>();
    prm.idx = i.data_ptr<int32_t>();
    prm.row_order = order.data_ptr<int32_t>();
    prm.bias = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    prm.out = out_t.data_ptr<scalar_t>();
    prm.out_ld = out_t.stride(0);
    prm.n_rows = static_cast<int32_t>(n_rows);
    prm.batch = static_cast<int32_t>(batch);
    prm.nnz = static_cast<int32_t>(v.numel());
    prm.n_cols = static_cast<int32_t>(dense_t.size(0));
    C10_CUDA_CHECK(launch_csr_dense_rowsplit<scalar_t>(prm, stream()));
  });
  // written transposed so each warp stores a contiguous batch run; one copy turns it around
  return out_t.t().contiguous();
}

Tensor empty_product(int64_t batch, int64_t n, const Tensor& like, const OptTensor& bias) {
  Tensor out = at::zeros({batch, n}, like.options());
  if (bias && batch > 0) out.add_(*bias);
  return out;
}

// ----------------------------------------------------------------------------- ops

Tensor spmm_cuda(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col, const OptTensor& bias) {
  const int64_t O = check_spmm(x, values, crow, col, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  check_index_range(crow, col, x.size(1), "crow", "col", "x's feature dimension (x.size(1))");
  const int64_t B = x.size(0);
  if (B == 0 || O == 0 || values.numel() == 0) return empty_product(B, O, x, bias);
  return rowsplit(batch_major(x), values, c10::nullopt, crow, col, bias, O, B);
}

Tensor sparse_linear_cuda(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                          const Tensor& ccol, const Tensor& /*row*/, const Tensor& /*perm*/,
                          const OptTensor& bias, const OptTensor& active) {
  const int64_t O = check_spmm(x, values, crow, col, bias);
  check_active(active, O, x);
  // the CSC side is only used by backward, but a ticket of the wrong width must fail here
  check_index(ccol, "ccol", x, "x");
  TORCH_CHECK(x.size(1) == ccol.numel() - 1, "sparseticket: x has ", x.size(1),
              " features but the ticket expects in_features=", ccol.numel() - 1);
  return spmm_cuda(x, values, crow, col, bias);
}

Tensor spmm_t_cuda(const Tensor& gy, const Tensor& values, const Tensor& ccol, const Tensor& row,
                   const Tensor& perm) {
  check_float(gy, "gy");
  check_dim(gy, 2, "gy");
  check_dim(values, 1, "values");
  TORCH_CHECK(values.scalar_type() == gy.scalar_type(), "sparseticket: values has dtype ", values.scalar_type(),
              " but gy has ", gy.scalar_type());
  check_index(ccol, "ccol", gy, "gy");
  check_index(row, "row", gy, "gy");
  check_index(perm, "perm", gy, "gy");
  check_same_device(values, "values", gy, "gy");
  TORCH_CHECK(ccol.numel() >= 1, "sparseticket: ccol must have I + 1 >= 1 entries");
  TORCH_CHECK(row.numel() == values.numel(), "sparseticket: row has ", row.numel(), " entries but values has ",
              values.numel());
  TORCH_CHECK(perm.numel() == values.numel(), "sparseticket: perm has ", perm.numel(), " entries but values has ",
              values.numel());
  const c10::cuda::CUDAGuard guard(gy.device());
  check_index_range(ccol, row, gy.size(1), "ccol", "row", "gy's feature dimension (gy.size(1))");
  const int64_t B = gy.size(0), I = ccol.numel() - 1;
  if (B == 0 || I == 0 || values.numel() == 0) return empty_product(B, I, gy, c10::nullopt);
  return rowsplit(batch_major(gy), values, perm, ccol, row, c10::nullopt, I, B);
}

void check_pair(const Tensor& gy, const Tensor& x) {
  check_float(gy, "gy");
  check_dim(gy, 2, "gy");
  check_float(x, "x");
  check_dim(x, 2, "x");
  check_same_dtype(gy, "gy", x, "x");
  check_same_device(x, "x", gy, "gy");
  TORCH_CHECK(gy.size(0) == x.size(0), "sparseticket: gy has batch ", gy.size(0), " but x has batch ", x.size(0));
}

Tensor sddmm_cuda(const Tensor& gy, const Tensor& x, const Tensor& crow, const Tensor& col, const OptTensor& active) {
  check_pair(gy, x);
  check_index(crow, "crow", gy, "gy");
  check_index(col, "col", gy, "gy");
  const int64_t O = crow.numel() - 1;
  TORCH_CHECK(gy.size(1) == O, "sparseticket: gy has ", gy.size(1), " columns but crow describes ", O, " rows");
  check_active(active, O, gy);
  const c10::cuda::CUDAGuard guard(gy.device());
  check_index_range(crow, col, x.size(1), "crow", "col", "x's feature dimension (x.size(1))");
  const int64_t nnz = col.numel(), B = gy.size(0);
  if (nnz == 0 || B == 0) return at::zeros({nnz}, gy.options());
  check_int32_range(O, "rows");
  check_int32_range(B, "batch");
  check_int32_range(nnz, "nnz");
  Tensor out = at::empty({nnz}, gy.options());
  const Tensor gy_t = batch_major(gy), x_t = batch_major(x);
  const Tensor c = crow.contiguous(), k = col.contiguous();
  const Tensor order = heavy_rows_first(c);
  const Tensor a = active ? active->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "sparseticket_sddmm", [&] {
    SddmmParams<scalar_t> prm{};
    prm.gy = gy_t.data_ptr<scalar_t>();
    prm.gy_ld = gy_t.stride(0);
    prm.x = x_t.data_ptr<scalar_t>();
    prm.x_ld = x_t.stride(0);
    prm.crow = c.data_ptr<int32_t>();
    prm.col = k.data_ptr<int32_t>();
    prm.active = a.defined() ? reinterpret_cast<const uint8_t*>(a.data_ptr<bool>()) : nullptr;
    prm.row_order = order.data_ptr<int32_t>();
    prm.out = out.data_ptr<scalar_t>();
    prm.n_rows = static_cast<int32_t>(O);
    prm.batch = static_cast<int32_t>(B);
    prm.n_cols = static_cast<int32_t>(x.size(1));
    prm.nnz = static_cast<int32_t>(nnz);
    C10_CUDA_CHECK(launch_sddmm<scalar_t>(prm, stream()));
  });
  return out;
}

// Dense weight gradient over the active rows only: cuBLAS on the gathered rows. The gather
// needs the number of active rows on the host (one sync per call); the Triton kernel avoids it.
Tensor row_masked_grad_weight_cuda(const Tensor& gy, const Tensor& x, const OptTensor& active) {
  check_pair(gy, x);
  check_active(active, gy.size(1), gy);
  const c10::cuda::CUDAGuard guard(gy.device());
  if (!active) return at::mm(gy.t(), x).contiguous();
  Tensor out = at::zeros({gy.size(1), x.size(1)}, gy.options());
  const Tensor rows = at::nonzero(*active).squeeze(1);
  if (rows.numel() == 0 || gy.size(0) == 0) return out;
  out.index_copy_(0, rows, at::mm(gy.index_select(1, rows).t(), x));
  return out;
}

Tensor neq_linear_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& active) {
  check_float(x, "x");
  check_dim(x, 2, "x");
  check_dim(weight, 2, "weight");
  check_same_dtype(weight, "weight", x, "x");
  check_same_device(weight, "weight", x, "x");
  TORCH_CHECK(weight.size(1) == x.size(1), "sparseticket: weight has in_features ", weight.size(1), " but x has ",
              x.size(1));
  check_bias(bias, weight.size(0), x);
  check_active(active, weight.size(0), x);
  const c10::cuda::CUDAGuard guard(x.device());
  return at::linear(x, weight, bias).contiguous();
}

// ----------------------------------------------------------------------------- masked SGD

template <typename Row>
Tensor device_table(const std::vector<Row>& rows, const at::Device& device) {
  const int64_t bytes = static_cast<int64_t>(rows.size() * sizeof(Row));
  Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), rows.data(), static_cast<size_t>(bytes));
  // pinned + non_blocking: the caching host allocator keeps `host` alive until the copy ran
  return host.to(device, /*non_blocking=*/true);
}

struct SgdEntry {
  Tensor p, g, buf, keep, active, row_ptr;
  int64_t mode = kActiveNone, row_len = 1, n_rows = 0;
  bool fresh = false;
};

template <typename T>
void launch_sgd_group(const std::vector<SgdEntry>& entries, const at::Device& device, double lr, double momentum,
                      double dampening, double weight_decay, bool nesterov, bool maximize) {
  std::vector<MaskedSgdTensor<T>> table;
  std::vector<MaskedChunk> chunks;
  for (const SgdEntry& e : entries) {
    MaskedSgdTensor<T> t{};
    t.param = e.p.data_ptr<T>();
    t.grad = e.g.data_ptr<T>();
    t.momentum_buffer = e.buf.defined() ? e.buf.data_ptr<T>() : nullptr;
    t.keep = e.keep.defined() ? reinterpret_cast<const uint8_t*>(e.keep.data_ptr<bool>()) : nullptr;
    t.active = e.active.defined() ? reinterpret_cast<const uint8_t*>(e.active.data_ptr<bool>()) : nullptr;
    t.row_ptr = e.row_ptr.defined() ? e.row_ptr.data_ptr<int32_t>() : nullptr;
    t.numel = e.p.numel();
    t.row_len = e.row_len;
    t.n_rows = e.n_rows;
    t.mode = e.mode;
    t.fresh = e.fresh ? 1 : 0;
    const int64_t index = static_cast<int64_t>(table.size());
    for (int64_t s = 0; s < t.numel; s += kMaskedChunk) chunks.push_back({index, s});
    table.push_back(t);
  }
  if (chunks.empty()) return;
  const Tensor tensors_dev = device_table(table, device);
  const Tensor chunks_dev = device_table(chunks, device);
  MaskedSgdParams<T> prm{};
  prm.tensors = reinterpret_cast<const MaskedSgdTensor<T>*>(tensors_dev.data_ptr());
  prm.chunks = reinterpret_cast<const MaskedChunk*>(chunks_dev.data_ptr());
  prm.n_chunks = static_cast<int64_t>(chunks.size());
  prm.chunk_size = kMaskedChunk;
  prm.lr = lr;
  prm.momentum = momentum;
  prm.dampening = dampening;
  prm.weight_decay = weight_decay;
  prm.nesterov = nesterov;
  prm.maximize = maximize;
  C10_CUDA_CHECK(launch_masked_sgd<T>(prm, stream()));
}

void masked_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs, const OptTensorList& keeps,
                     const OptTensorList& actives, const OptTensorList& row_ptrs, c10::List<bool> fresh, double lr,
                     double momentum, double dampening, double weight_decay, bool nesterov, bool maximize) {
  const int64_t n = static_cast<int64_t>(params.size());
  auto len_check = [&](int64_t got, const char* name) {
    TORCH_CHECK(got == n, "sparseticket: masked_sgd_: ", name, " has ", got, " entries but params has ", n);
  };
  len_check(static_cast<int64_t>(grads.size()), "grads");
  len_check(static_cast<int64_t>(keeps.size()), "keep_masks");
  len_check(static_cast<int64_t>(actives.size()), "active_masks");
  len_check(static_cast<int64_t>(row_ptrs.size()), "row_ptrs");
  len_check(static_cast<int64_t>(fresh.size()), "fresh");
  const bool use_buf = momentum != 0;
  if (use_buf) len_check(static_cast<int64_t>(bufs.size()), "momentum_buffers");

  std::map<std::pair<int64_t, int64_t>, std::vector<SgdEntry>> groups;  // (device, dtype) -> entries
  std::vector<std::pair<Tensor, Tensor>> copy_back;                   // strided originals <- staged copies
  auto staged = [&](const Tensor& t) {
    if (t.is_contiguous()) return t;
    Tensor c = t.contiguous();
    copy_back.emplace_back(t, c);
    return c;
  };
  for (int64_t j = 0; j < n; ++j) {
    const std::string js = "[" + std::to_string(j) + "]";
    const std::string pj = "params" + js;
    const Tensor& p = params[j];
    check_float(p, pj);
    const Tensor& g = grads[j];
    TORCH_CHECK(g.sizes() == p.sizes(), "sparseticket: grads", js, " has shape ", g.sizes(), " but ", pj, " has ",
                p.sizes());
    check_same_dtype(g, "grads" + js, p, pj);
    check_same_device(g, "grads" + js, p, pj);
    TORCH_CHECK(p.is_cuda(), "sparseticket: ", pj, " is on ", p.device(), " but the CUDA kernel was called");
    SgdEntry e;
    if (use_buf) {
      const Tensor& b = bufs[j];
      TORCH_CHECK(b.sizes() == p.sizes(), "sparseticket: momentum_buffers", js, " has shape ", b.sizes(), " but ", pj,
                  " has ", p.sizes());
      check_same_dtype(b, "momentum_buffers" + js, p, pj);
      check_same_device(b, "momentum_buffers" + js, p, pj);
    }
    const OptTensor keep = keeps.get(j);
    if (keep) {
      check_bool(*keep, "keep_masks" + js);
      TORCH_CHECK(keep->sizes() == p.sizes(), "sparseticket: keep_masks", js, " has shape ", keep->sizes(), " but ",
                  pj, " has ", p.sizes());
      check_same_device(*keep, "keep_masks" + js, p, pj);
    }
    const OptTensor active = actives.get(j);
    const OptTensor row_ptr = row_ptrs.get(j);
    if (row_ptr) {
      check_index(*row_ptr, "row_ptrs" + js, p, pj);
      TORCH_CHECK(p.dim() == 1, "sparseticket: ", pj, " has row_ptrs so must be 1-D compact values, got shape ",
                  p.sizes());
    }
    if (active) {
      check_bool(*active, "active_masks" + js);
      check_same_device(*active, "active_masks" + js, p, pj);
      if (row_ptr) {
        TORCH_CHECK(active->dim() == 1 && active->size(0) == row_ptr->numel() - 1, "sparseticket: active_masks", js,
                    " has shape ", active->sizes(), " but row_ptrs", js, " describes ", row_ptr->numel() - 1, " rows");
        e.mode = kActiveCsrRow;
        e.n_rows = row_ptr->numel() - 1;
        e.row_ptr = row_ptr->contiguous();
      } else if (active->sizes() == p.sizes()) {
        e.mode = kActiveElement;
      } else {
        TORCH_CHECK(active->dim() == 1 && p.dim() >= 1 && active->size(0) == p.size(0), "sparseticket: active_masks",
                    js, " has shape ", active->sizes(), "; expected ", p.sizes(), " (elements) or [",
                    p.dim() ? p.size(0) : 1, "] (rows) for ", pj);
        e.mode = kActiveRow;
        e.row_len = p.size(0) > 0 ? std::max<int64_t>(1, p.numel() / p.size(0)) : 1;
      }
      e.active = active->contiguous();
    }
    if (p.numel() == 0) continue;
    e.p = staged(p);
    e.g = g.contiguous();
    if (use_buf) e.buf = staged(bufs[j]);
    if (keep) e.keep = keep->contiguous();
    e.fresh = fresh.get(j);
    groups[{static_cast<int64_t>(p.get_device()), static_cast<int64_t>(p.scalar_type())}].push_back(std::move(e));
  }
  for (auto& kv : groups) {
    const Tensor& first = kv.second.front().p;
    const c10::cuda::CUDAGuard guard(first.device());
    if (first.scalar_type() == at::kFloat) {
      launch_sgd_group<float>(kv.second, first.device(), lr, momentum, dampening, weight_decay, nesterov, maximize);
    } else {
      launch_sgd_group<double>(kv.second, first.device(), lr, momentum, dampening, weight_decay, nesterov, maximize);
    }
  }
  for (auto& dst_src : copy_back) dst_src.first.copy_(dst_src.second);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseticket, CUDA, m) {
  m.impl("spmm", &spmm_cuda);
  m.impl("sparse_linear", &sparse_linear_cuda);
  m.impl("spmm_t", &spmm_t_cuda);
  m.impl("sddmm", &sddmm_cuda);
  m.impl("row_masked_grad_weight", &row_masked_grad_weight_cuda);
  m.impl("neq_linear", &neq_linear_cuda);
  m.impl("masked_sgd_", &masked_sgd_cuda);
}

}  // namespace gpu
}  // namespace sparseticket
