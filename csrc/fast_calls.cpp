// Python entry points that reach an op through the C++ dispatcher instead of
// torch.ops.sparseticket.<op>(...).
//
// torch.ops converts every argument against the schema in Python-facing code, ~0.2 us per
// list element: masked_sgd_'s seven lists cost ~9 us per call for a six-parameter model
// (LeNet-300-100), against ~2 us of arithmetic. pybind11's casters take the same lists in
// ~1-2 us. The op is still called through the dispatcher, so the profiler, the device
// dispatch and every backend see the same call; only the Python-side parsing differs.
// Grad mode is off inside, as under the torch.no_grad() an optimizer step runs in.
#include <torch/extension.h>

#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>

#include "op_calls.h"

namespace sparseticket {
namespace {

using at::Tensor;
using OptList = std::vector<c10::optional<Tensor>>;

void masked_sgd_call(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                     const std::vector<Tensor>& bufs, const OptList& keeps, const OptList& actives,
                     const OptList& row_ptrs, const std::vector<bool>& fresh, double lr, double momentum,
                     double dampening, double weight_decay, bool nesterov, bool maximize) {
  auto to_list = [](const OptList& v) {
    c10::List<c10::optional<Tensor>> l;
    l.reserve(v.size());
    for (const auto& t : v) l.push_back(t);
    return l;
  };
  // an optimizer step: in-place updates of leaves that require grad, never recorded
  c10::AutoGradMode no_grad(false);
  // nothing to record: skip the Autograd key's boxed fallback (the ADInplaceOrView kernel
  // in csrc/inplace.cpp still bumps the version counters)
  at::AutoDispatchBelowAutograd below;
  c10::List<bool> f;
  f.reserve(fresh.size());
  for (bool b : fresh) f.push_back(b);
  calls::call_masked_sgd_(params, grads, bufs, to_list(keeps), to_list(actives), to_list(row_ptrs), std::move(f), lr,
                          momentum, dampening, weight_decay, nesterov, maximize);
}

// sparse_linear / sparse_linear_relu as SparseLinear calls them (grad mode as the caller
// has it, so the autograd kernel records the node when it should).
Tensor sparse_linear_call(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                          const Tensor& ccol, const Tensor& row, const Tensor& perm, const c10::optional<Tensor>& bias,
                          const c10::optional<Tensor>& active, bool relu) {
  return relu ? calls::call_sparse_linear_relu(x, values, crow, col, ccol, row, perm, bias, active)
              : calls::call_sparse_linear(x, values, crow, col, ccol, row, perm, bias, active);
}

}  // namespace

void register_fast_calls(pybind11::module& m) {
  // the arguments are converted with the GIL held; the step itself releases it, as
  // torch.ops does
  m.def("masked_sgd_call", &masked_sgd_call, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "torch.ops.sparseticket.masked_sgd_ (same arguments, same dispatch) without torch.ops' argument parsing.");
  m.def("sparse_linear_call", &sparse_linear_call, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "torch.ops.sparseticket.sparse_linear_relu if relu else sparse_linear (same arguments, same dispatch) "
        "without torch.ops' argument parsing.");
}

}  // namespace sparseticket
