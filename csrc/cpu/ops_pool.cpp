// ATen glue for the 2x2, stride-2 max-pool (conv.h, Pool2Fn): checks, threading over
// planes, registration. Schemas live in sparseticket/ops/_library.py.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "checks.h"
#include "conv.h"

namespace sparseticket {
namespace cpu {
namespace {

using at::Tensor;
using namespace checks;

// the fewest planes worth a thread (~32K input elements): smaller batches run on one thread
int64_t plane_grain(int64_t H, int64_t W) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, H * W));
}

std::tuple<Tensor, Tensor> max_pool2x2_cpu(const Tensor& x_) {
  check_float(x_, "x");
  check_dim(x_, 4, "x");
  check_cpu(x_, "x");
  const int64_t N = x_.size(0), C = x_.size(1), H = x_.size(2), W = x_.size(3);
  TORCH_CHECK(H >= 2 && W >= 2, "sparseticket: max_pool2x2: x has spatial size (", H, ", ", W,
              "), smaller than the 2x2 window");
  const Tensor x = x_.contiguous();
  Tensor y = at::empty({N, C, H / 2, W / 2}, x.options());
  Tensor where = at::empty({N, C, H / 2, W / 2}, x.options().dtype(at::kByte));
  const ConvKernelTable& kt = conv_kernel_table();
  const bool f64 = x.scalar_type() == at::kDouble;
  const size_t elem = x.element_size();
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* yp = static_cast<char*>(y.data_ptr());
  uint8_t* wp = where.data_ptr<uint8_t>();
  const int64_t out_plane = (H / 2) * (W / 2);
  at::parallel_for(0, N * C, plane_grain(H, W), [&](int64_t p0, int64_t p1) {
    (f64 ? kt.pool2_f64 : kt.pool2_f32)(xp + p0 * H * W * elem, p1 - p0, H, W, yp + p0 * out_plane * elem,
                                        wp + p0 * out_plane);
  });
  return {y, where};
}

Tensor max_pool2x2_backward_cpu(const Tensor& gy_, const Tensor& where_, c10::SymIntArrayRef input_size_) {
  check_float(gy_, "gy");
  check_dim(gy_, 4, "gy");
  check_cpu(gy_, "gy");
  TORCH_CHECK(where_.scalar_type() == at::kByte, "sparseticket: where must be uint8, got ", where_.scalar_type());
  check_cpu(where_, "where");
  TORCH_CHECK(where_.sizes() == gy_.sizes(), "sparseticket: where has shape ", where_.sizes(), " but gy has ",
              gy_.sizes());
  TORCH_CHECK(input_size_.size() == 4, "sparseticket: input_size must have 4 entries, got ", input_size_.size());
  const int64_t N = input_size_[0].expect_int(), C = input_size_[1].expect_int();
  const int64_t H = input_size_[2].expect_int(), W = input_size_[3].expect_int();
  TORCH_CHECK(gy_.size(0) == N && gy_.size(1) == C && gy_.size(2) == H / 2 && gy_.size(3) == W / 2 && H >= 2 &&
                  W >= 2,
              "sparseticket: gy has shape ", gy_.sizes(), " but a 2x2 pool of input_size ", input_size_, " gives (", N,
              ", ", C, ", ", H / 2, ", ", W / 2, ")");
  const Tensor gy = gy_.contiguous(), where = where_.contiguous();
  Tensor gx = at::empty({N, C, H, W}, gy.options());
  const ConvKernelTable& kt = conv_kernel_table();
  const bool f64 = gy.scalar_type() == at::kDouble;
  const size_t elem = gy.element_size();
  const char* gp = static_cast<const char*>(gy.data_ptr());
  const uint8_t* wp = where.data_ptr<uint8_t>();
  char* xp = static_cast<char*>(gx.data_ptr());
  const int64_t out_plane = (H / 2) * (W / 2);
  at::parallel_for(0, N * C, plane_grain(H, W), [&](int64_t p0, int64_t p1) {
    (f64 ? kt.pool2_backward_f64 : kt.pool2_backward_f32)(gp + p0 * out_plane * elem, wp + p0 * out_plane,
                                                          p1 - p0, H, W, xp + p0 * H * W * elem);
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseticket, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2_cpu);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_cpu);
}

}  // namespace cpu
}  // namespace sparseticket
