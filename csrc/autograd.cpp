// Autograd for sparseticket's differentiable ops, in C++ so a training step pays no
// Python per layer (the Python register_autograd path cost ~40 us per forward and more
// per backward at LeNet sizes). The backward is built from sparseticket ops called
// through the dispatcher, so it serves every device that has kernels (CPU, CUDA).
//
// sparseticket/ops/__init__.py registers the same formulas in Python only when this
// library is not loaded (the reference path).
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_calls.h"

namespace sparseticket {
namespace {

using at::Tensor;
using namespace calls;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::optional<Tensor> opt(const Tensor& t) { return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt; }

// The gradients of a ticket layer from gy, the gradient of its output; `y` (the saved
// output of sparse_linear_relu) masks gy first. When the kept values need a gradient
// (training), one sparse_linear_backward call computes everything; otherwise the
// separate ops run for what is needed.
variable_list sparse_linear_grads(AutogradContext* ctx, const Tensor& gy, const variable_list& saved,
                                  const Tensor& y) {
  const Tensor &x = saved[0], &values = saved[1], &crow = saved[2], &col = saved[3], &ccol = saved[4],
               &row = saved[5], &perm = saved[6], &active = saved[7];
  const bool want_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(7);
  Tensor gx, gv, gb;
  const BelowAutogradUnlessRecording below;
  if (ctx->needs_input_grad(1)) {
    std::tie(gx, gv, gb) = call_sparse_linear_backward(gy.contiguous(), opt(y), x, values, crow, col, ccol, row,
                                                       perm, opt(active), ctx->needs_input_grad(0));
    if (!ctx->needs_input_grad(0)) gx = Tensor();
    if (!want_bias) gb = Tensor();
  } else {
    const Tensor g = (y.defined() ? at::threshold_backward(gy, y, 0) : gy).contiguous();
    if (ctx->needs_input_grad(0)) gx = call_spmm_t(g, values, ccol, row, perm);
    if (want_bias) gb = call_masked_bias_grad(g, opt(active));
  }
  return {gx, gv, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), gb, Tensor()};
}

class SparseLinearFunction : public torch::autograd::Function<SparseLinearFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& values, const Tensor& crow,
                        const Tensor& col, const Tensor& ccol, const Tensor& row, const Tensor& perm,
                        const c10::optional<Tensor>& bias, const c10::optional<Tensor>& active) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor y = call_sparse_linear(x, values, crow, col, ccol, row, perm, bias, active);
    ctx->save_for_backward({x, values, crow, col, ccol, row, perm, active ? *active : Tensor()});
    ctx->saved_data["has_bias"] = bias.has_value();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return sparse_linear_grads(ctx, grads[0], ctx->get_saved_variables(), Tensor());
  }
};

// relu(sparse_linear(...)) as one node: the output is saved and masks the incoming
// gradient (threshold_backward, what ReluBackward0 computes), so a Linear+ReLU pair costs
// one autograd node and one forward op instead of two of each.
class SparseLinearReluFunction : public torch::autograd::Function<SparseLinearReluFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& values, const Tensor& crow,
                        const Tensor& col, const Tensor& ccol, const Tensor& row, const Tensor& perm,
                        const c10::optional<Tensor>& bias, const c10::optional<Tensor>& active) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor y = call_sparse_linear_relu(x, values, crow, col, ccol, row, perm, bias, active);
    ctx->save_for_backward({x, values, crow, col, ccol, row, perm, active ? *active : Tensor(), y});
    ctx->saved_data["has_bias"] = bias.has_value();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return sparse_linear_grads(ctx, grads[0], saved, saved[8]);
  }
};

class NeqLinearFunction : public torch::autograd::Function<NeqLinearFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                        const c10::optional<Tensor>& active) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor y = call_neq_linear(x, weight, bias, active);
    ctx->save_for_backward({x, weight, active ? *active : Tensor()});
    ctx->saved_data["has_bias"] = bias.has_value();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();  // first: unpacking may recompute (checkpoint)
    const BelowAutogradUnlessRecording below;
    const Tensor &x = saved[0], &weight = saved[1], &active = saved[2];
    const NeqGrads g =
        neq_linear_grads(grads[0].contiguous(), x, weight, opt(active), ctx->needs_input_grad(0),
                         ctx->needs_input_grad(1), ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2));
    return {g.gx, g.gw, g.gb, Tensor()};
  }
};

// The dense path of a SparseLinear expands its values every step; the gradient of the
// dense weight goes back to the kept entries through the same bitmap. (The Python
// register_autograd version of this node cost ~50 us more per step at 784x300.)
class TicketExpandFunction : public torch::autograd::Function<TicketExpandFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& values, const Tensor& crow, const Tensor& bits,
                        const c10::SymInt& n_cols) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({crow, bits});
    ctx->saved_data["nnz"] = values.sym_size(0);
    return call_ticket_expand(values, crow, bits, n_cols);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();  // first: unpacking may recompute (checkpoint)
    const BelowAutogradUnlessRecording below;
    return {call_ticket_compress(grads[0], saved[0], saved[1], ctx->saved_data["nnz"].toSymInt()), Tensor(), Tensor(),
            Tensor()};
  }
};

Tensor ticket_expand_autograd(const Tensor& values, const Tensor& crow, const Tensor& bits, c10::SymInt n_cols) {
  return TicketExpandFunction::apply(values, crow, bits, n_cols);
}

Tensor sparse_linear_autograd(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                              const Tensor& ccol, const Tensor& row, const Tensor& perm,
                              const c10::optional<Tensor>& bias, const c10::optional<Tensor>& active) {
  return SparseLinearFunction::apply(x, values, crow, col, ccol, row, perm, bias, active);
}

Tensor sparse_linear_relu_autograd(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                                   const Tensor& ccol, const Tensor& row, const Tensor& perm,
                                   const c10::optional<Tensor>& bias, const c10::optional<Tensor>& active) {
  return SparseLinearReluFunction::apply(x, values, crow, col, ccol, row, perm, bias, active);
}

Tensor neq_linear_autograd(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                           const c10::optional<Tensor>& active) {
  return NeqLinearFunction::apply(x, weight, bias, active);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseticket, Autograd, m) {
  m.impl("sparse_linear", &sparse_linear_autograd);
  m.impl("sparse_linear_relu", &sparse_linear_relu_autograd);
  m.impl("neq_linear", &neq_linear_autograd);
  m.impl("ticket_expand", &ticket_expand_autograd);
}

}  // namespace sparseticket
