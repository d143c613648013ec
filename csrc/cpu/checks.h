// Argument checks shared by the CPU ATen glue files (one message style for every op).
#pragma once
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "kernels.h"

#include <algorithm>
#include <utility>

namespace sparseticket {
namespace cpu {
namespace checks {

using at::Tensor;

inline void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "sparseticket: ", name,
              " must be float32 or float64, got ", t.scalar_type());
}
inline void check_dim(const Tensor& t, int64_t d, const char* name) {
  TORCH_CHECK(t.dim() == d, "sparseticket: ", name, " must be ", d, "-D, got shape ", t.sizes());
}
inline void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "sparseticket: ", name, " is on ", t.device(),
              " but the CPU kernel was called; all arguments must be on the same device");
}
inline void check_index(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "sparseticket: ", name, " must be int32, got ", t.scalar_type());
  check_dim(t, 1, name);
  check_cpu(t, name);
}
inline void check_same_dtype(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "sparseticket: ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type());
}
inline void check_bool_mask(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBool, "sparseticket: ", name, " must be a torch.bool mask, got ",
              t.scalar_type());
  check_cpu(t, name);
}
inline void check_active(const c10::optional<Tensor>& active, int64_t n) {
  if (!active) return;
  check_bool_mask(*active, "active");
  check_dim(*active, 1, "active");
  TORCH_CHECK(active->size(0) == n, "sparseticket: active has ", active->size(0), " entries, expected out_features=", n);
}
// Row pointers must start at 0, never decrease and end at nnz: O(rows), on every call,
// before anything is read through them (`ptr` contiguous). The pass is the ISA kernel's
// (kernels.h, DecreasesFn): the baseline glue's scalar loop with an early exit took ~11k
// instructions per LeNet-300-100 step (callgrind), a fifth of the indices' range check.
inline void check_ptr(const Tensor& ptr, int64_t nnz, const char* name) {
  TORCH_CHECK(ptr.numel() >= 1, "sparseticket: ", name, " must have at least one entry");
  const int32_t* p = ptr.data_ptr<int32_t>();
  const int64_t R = ptr.numel() - 1;
  TORCH_CHECK(p[0] == 0 && p[R] == nnz, "sparseticket: ", name, " must start at 0 and end at nnz=", nnz, ", got ",
              p[0], " and ", p[R]);
  if (R == 0 || kernel_table().decreases(p, R) == 0) return;  // the ISA's vectors; the message only on failure
  int64_t bad = -1;
  for (int64_t r = 0; r < R; ++r)
    if (p[r + 1] < p[r]) {
      bad = r;
      break;
    }
  TORCH_CHECK(bad < 0, "sparseticket: ", name, " must be non-decreasing, but ", name, "[", bad + 1, "]=", p[bad + 1],
              " < ", name, "[", bad, "]=", p[bad]);
}
// Every index must address a row of the dense operand. One vectorised min/max pass over
// the int32 indices costs ~1/(2B) of a matmul's own work, so it runs on every call: a
// malformed or mismatched ticket raises instead of reading out of bounds (`idx` contiguous).
inline void check_index_range(const Tensor& idx, int64_t K, const char* idx_name, const char* operand) {
  const int32_t* ix = idx.data_ptr<int32_t>();
  const int64_t n = idx.numel();
  // (lo, hi) over [b, e), by the ISA's kernel (kernels.h); split across the threads above
  // 64K entries (a 1.7M-entry ticket, 6.8 MB of indices, is read from memory)
  const IndexRangeFn fn = kernel_table().index_range;
  auto range = [ix, fn](int64_t b, int64_t e) {
    int32_t lo = 0, hi = 0;
    fn(ix + b, e - b, &lo, &hi);
    return std::pair<int32_t, int32_t>(lo, hi);
  };
  if (n == 0) return;
  std::pair<int32_t, int32_t> r = range(0, std::min<int64_t>(n, 1));
  if (n > 1) {
    r = at::parallel_reduce(
        int64_t(0), n, int64_t(1) << 16, r, [&](int64_t b, int64_t e, std::pair<int32_t, int32_t> acc) {
          const auto m = range(b, e);
          return std::pair<int32_t, int32_t>(std::min(acc.first, m.first), std::max(acc.second, m.second));
        },
        [](std::pair<int32_t, int32_t> a, std::pair<int32_t, int32_t> b) {
          return std::pair<int32_t, int32_t>(std::min(a.first, b.first), std::max(a.second, b.second));
        });
  }
  const int32_t lo = r.first, hi = r.second;
  TORCH_CHECK(lo >= 0 && hi < K, "sparseticket: ", idx_name, " has index ", lo < 0 ? lo : hi, " but ", operand,
              " has only ", K, " (is the ticket for a different in/out size?)");
}

inline Tensor contiguous_1d(const Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

}  // namespace checks
}  // namespace cpu
}  // namespace sparseticket
