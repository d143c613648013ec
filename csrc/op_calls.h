// Typed dispatcher handles for sparseticket's ops, for C++ code that calls them (the
// autograd formulas, the MLP step). Going through the dispatcher, not the CPU functions,
// keeps one code path for every device that has kernels.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <ATen/core/List.h>
#include <c10/util/Optional.h>

namespace sparseticket {
namespace calls {

using at::Tensor;

// For the C++ backward formulas (csrc/autograd*.cpp). Their sparseticket ops have no
// derivative of their own, so they reach their backend through torch's boxed Autograd
// fallback, which with grad mode off only boxes, checks and unboxes the arguments (1-2 us
// a call with eleven of them). Without create_graph a backward records nothing, so this
// guard sends every call below the Autograd key; with create_graph (grad mode on) it does
// nothing and the fallback marks what it returns as not differentiable, as before.
// Create it after ctx->get_saved_variables(): unpacking the saved tensors is where
// torch.utils.checkpoint re-runs the forward, which must record as usual.
class BelowAutogradUnlessRecording {
 public:
  BelowAutogradUnlessRecording() {
    if (!c10::GradMode::is_enabled()) guard_.emplace();
  }

 private:
  c10::optional<at::AutoDispatchBelowADInplaceOrView> guard_;
};

inline Tensor call_sparse_linear(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                          const Tensor& ccol, const Tensor& row, const Tensor& perm, const c10::optional<Tensor>& bias,
                          const c10::optional<Tensor>& active) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparseticket::sparse_linear", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const Tensor&, const Tensor&, const c10::optional<Tensor>&,
                                     const c10::optional<Tensor>&)>();
  return op.call(x, values, crow, col, ccol, row, perm, bias, active);
}

inline Tensor call_sparse_linear_relu(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                               const Tensor& ccol, const Tensor& row, const Tensor& perm,
                               const c10::optional<Tensor>& bias, const c10::optional<Tensor>& active) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparseticket::sparse_linear_relu", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const Tensor&, const Tensor&, const c10::optional<Tensor>&,
                                     const c10::optional<Tensor>&)>();
  return op.call(x, values, crow, col, ccol, row, perm, bias, active);
}

inline Tensor call_spmm_t(const Tensor& gy, const Tensor& values, const Tensor& ccol, const Tensor& row, const Tensor& perm) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparseticket::spmm_t", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
  return op.call(gy, values, ccol, row, perm);
}

inline Tensor call_sddmm(const Tensor& gy, const Tensor& x, const Tensor& crow, const Tensor& col,
                  const c10::optional<Tensor>& active) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparseticket::sddmm", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const c10::optional<Tensor>&)>();
  return op.call(gy, x, crow, col, active);
}

inline std::tuple<Tensor, Tensor, Tensor> call_sparse_linear_backward(
    const Tensor& gy, const c10::optional<Tensor>& y, const Tensor& x, const Tensor& values, const Tensor& crow,
    const Tensor& col, const Tensor& ccol, const Tensor& row, const Tensor& perm,
    const c10::optional<Tensor>& active, bool input_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparseticket::sparse_linear_backward", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const c10::optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const c10::optional<Tensor>&, bool)>();
  return op.call(gy, y, x, values, crow, col, ccol, row, perm, active, input_grad);
}

inline Tensor call_neq_linear(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                       const c10::optional<Tensor>& active) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparseticket::neq_linear", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const c10::optional<Tensor>&,
                                     const c10::optional<Tensor>&)>();
  return op.call(x, weight, bias, active);
}

inline Tensor call_masked_bias_grad(const Tensor& gy, const c10::optional<Tensor>& active) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparseticket::masked_bias_grad", "")
                       .typed<Tensor(const Tensor&, const c10::optional<Tensor>&)>();
  return op.call(gy, active);
}

inline Tensor call_row_masked_grad_weight(const Tensor& gy, const Tensor& x, const c10::optional<Tensor>& active) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparseticket::row_masked_grad_weight", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const c10::optional<Tensor>&)>();
  return op.call(gy, x, active);
}

// The gradients of an NEq linear layer (neq_linear) from gy, contiguous: the input
// gradient whole (frozen neurons still pass gradient to earlier layers), the weight and
// bias gradients with frozen rows 0, never computed; undefined where not wanted. Both
// NeqLinearFunction::backward (csrc/autograd.cpp) and the MLP chain's kNeq layers
// (csrc/mlp_step.cpp) call this, so the two stay bit-identical.
struct NeqGrads {
  Tensor gx, gw, gb;
};
inline NeqGrads neq_linear_grads(const Tensor& gy, const Tensor& x, const Tensor& weight,
                                 const c10::optional<Tensor>& active, bool want_gx, bool want_gw, bool want_gb) {
  NeqGrads g;
  if (want_gx) g.gx = gy.mm(weight);
  if (want_gw) g.gw = call_row_masked_grad_weight(gy, x, active);
  if (want_gb) g.gb = call_masked_bias_grad(gy, active);
  return g;
}

inline Tensor call_ticket_expand(const Tensor& values, const Tensor& crow, const Tensor& bits, const c10::SymInt& n_cols) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparseticket::ticket_expand", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, c10::SymInt)>();
  return op.call(values, crow, bits, n_cols);
}

inline Tensor call_ticket_compress(const Tensor& dense, const Tensor& crow, const Tensor& bits, const c10::SymInt& nnz) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparseticket::ticket_compress", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, c10::SymInt)>();
  return op.call(dense, crow, bits, nnz);
}

// masked_sgd_ with its list arguments already in the dispatcher's types (the Python
// entry in csrc/fast_calls.cpp and the fused update of csrc/mlp_step.cpp)
inline void call_masked_sgd_(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                             const c10::List<c10::optional<Tensor>>& keeps,
                             const c10::List<c10::optional<Tensor>>& actives,
                             const c10::List<c10::optional<Tensor>>& row_ptrs, c10::List<bool> fresh, double lr,
                             double momentum, double dampening, double weight_decay, bool nesterov, bool maximize) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparseticket::masked_sgd_", "")
                       .typed<void(at::TensorList, at::TensorList, at::TensorList,
                                   const c10::List<c10::optional<Tensor>>&, const c10::List<c10::optional<Tensor>>&,
                                   const c10::List<c10::optional<Tensor>>&, c10::List<bool>, double, double, double,
                                   double, bool, bool)>();
  op.call(params, grads, bufs, keeps, actives, row_ptrs, std::move(fresh), lr, momentum, dampening, weight_decay,
          nesterov, maximize);
}

}  // namespace calls
}  // namespace sparseticket
