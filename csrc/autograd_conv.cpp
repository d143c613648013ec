// Autograd for sparseticket::sparse_conv2d, in C++ like csrc/autograd.cpp (no Python per
// layer call). Backward is built from the conv ops through the dispatcher:
// grad_input (taps flipped), grad_weight (kept taps only, frozen channels skipped) and the
// bias gradient (frozen channels 0). sparseticket/ops/__init__.py registers the same
// formula in Python when the compiled library is not loaded.
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include "op_calls.h"

namespace sparseticket {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ConvSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       const Tensor&, const c10::optional<Tensor>&, const c10::optional<Tensor>&, at::IntArrayRef,
                       at::IntArrayRef, at::IntArrayRef, at::IntArrayRef);

// sparseticket::sparse_conv2d, or sparse_conv2d_relu when relu, below autograd
Tensor call_sparse_conv2d(bool relu, const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                          const Tensor& ccol, const Tensor& row, const Tensor& perm, const c10::optional<Tensor>& bias,
                          const c10::optional<Tensor>& active, at::IntArrayRef ks, at::IntArrayRef st,
                          at::IntArrayRef pad, at::IntArrayRef dil) {
  static auto plain =
      c10::Dispatcher::singleton().findSchemaOrThrow("sparseticket::sparse_conv2d", "").typed<ConvSig>();
  static auto fused =
      c10::Dispatcher::singleton().findSchemaOrThrow("sparseticket::sparse_conv2d_relu", "").typed<ConvSig>();
  return (relu ? fused : plain).call(x, values, crow, col, ccol, row, perm, bias, active, ks, st, pad, dil);
}

Tensor call_grad_input(const Tensor& gy, const Tensor& values, const Tensor& crow, const Tensor& col,
                       c10::SymIntArrayRef input_size, at::IntArrayRef ks, at::IntArrayRef st, at::IntArrayRef pad,
                       at::IntArrayRef dil) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparseticket::sparse_conv2d_grad_input", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::SymIntArrayRef,
                                     at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
  return op.call(gy, values, crow, col, input_size, ks, st, pad, dil);
}

Tensor call_grad_weight(const Tensor& gy, const Tensor& x, const Tensor& ccol, const Tensor& row, const Tensor& perm,
                        const c10::optional<Tensor>& active, at::IntArrayRef ks, at::IntArrayRef st,
                        at::IntArrayRef pad, at::IntArrayRef dil) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparseticket::sparse_conv2d_grad_weight", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const c10::optional<Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                     at::IntArrayRef)>();
  return op.call(gy, x, ccol, row, perm, active, ks, st, pad, dil);
}

c10::optional<Tensor> opt(const Tensor& t) { return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt; }

// Relu: the op is sparse_conv2d_relu; its output is saved and masks gy in backward, as
// ReluBackward0 (threshold_backward) does.
template <bool Relu>
class SparseConv2dFunction : public torch::autograd::Function<SparseConv2dFunction<Relu>> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& values, const Tensor& crow,
                        const Tensor& col, const Tensor& ccol, const Tensor& row, const Tensor& perm,
                        const c10::optional<Tensor>& bias, const c10::optional<Tensor>& active, at::IntArrayRef ks,
                        at::IntArrayRef st, at::IntArrayRef pad, at::IntArrayRef dil) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor y = call_sparse_conv2d(Relu, x, values, crow, col, ccol, row, perm, bias, active, ks, st, pad, dil);
    // Relu: the output too (saved as an output, so no reference cycle through its grad_fn)
    ctx->save_for_backward({x, values, crow, col, ccol, row, perm, active ? *active : Tensor(),
                            Relu ? y : Tensor()});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["ks"] = ks.vec();
    ctx->saved_data["st"] = st.vec();
    ctx->saved_data["pad"] = pad.vec();
    ctx->saved_data["dil"] = dil.vec();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();  // first: unpacking may recompute (checkpoint)
    const calls::BelowAutogradUnlessRecording below;
    const Tensor &x = saved[0], &values = saved[1], &crow = saved[2], &col = saved[3], &ccol = saved[4],
                 &row = saved[5], &perm = saved[6], &active = saved[7];
    const auto ks = ctx->saved_data["ks"].toIntVector(), st = ctx->saved_data["st"].toIntVector();
    const auto pad = ctx->saved_data["pad"].toIntVector(), dil = ctx->saved_data["dil"].toIntVector();
    Tensor gy = grads[0];
    if (Relu) gy = at::threshold_backward(gy, saved[8], 0);
    gy = gy.contiguous();
    Tensor gx, gv, gb;
    if (ctx->needs_input_grad(0)) gx = call_grad_input(gy, values, crow, col, x.sym_sizes(), ks, st, pad, dil);
    if (ctx->needs_input_grad(1)) gv = call_grad_weight(gy, x, ccol, row, perm, opt(active), ks, st, pad, dil);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(7))
      gb = calls::call_masked_bias_grad(gy, opt(active));
    return {gx, gv, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), gb, Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

template <bool Relu>
Tensor sparse_conv2d_autograd(const Tensor& x, const Tensor& values, const Tensor& crow, const Tensor& col,
                              const Tensor& ccol, const Tensor& row, const Tensor& perm,
                              const c10::optional<Tensor>& bias, const c10::optional<Tensor>& active,
                              at::IntArrayRef ks, at::IntArrayRef st, at::IntArrayRef pad, at::IntArrayRef dil) {
  return SparseConv2dFunction<Relu>::apply(x, values, crow, col, ccol, row, perm, bias, active, ks, st, pad, dil);
}

// sparseticket::max_pool2x2 (the model registry's 2x2 pool, sparse and dense runs alike):
// its Python register_autograd formula cost ~0.7 ms a backward at Conv-4's first pool
// (64x64x28x28, batch 64) on top of the 0.4 ms op, mostly materialising a zero gradient
// for the non-differentiable `where` output; here that gradient is never formed. The
// backward calls max_pool2x2_backward through the dispatcher, so a create_graph backward
// records it (its own formula, in Python, gives the double backward).
class MaxPool2x2Function : public torch::autograd::Function<MaxPool2x2Function> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sparseticket::max_pool2x2", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&)>();
    Tensor y, where;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, where) = op.call(x);
    }
    ctx->save_for_backward({where});
    ctx->saved_data["input_size"] = c10::IValue(x.sym_sizes());
    ctx->mark_non_differentiable({where});
    ctx->set_materialize_grads(false);
    return {y, where};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sparseticket::max_pool2x2_backward", "")
                         .typed<Tensor(const Tensor&, const Tensor&, c10::SymIntArrayRef)>();
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return {Tensor()};
    const calls::BelowAutogradUnlessRecording below;
    const std::vector<c10::SymInt> size = ctx->saved_data["input_size"].toSymIntVector();
    return {op.call(grads[0].contiguous(), saved[0], size)};
  }
};

std::tuple<Tensor, Tensor> max_pool2x2_autograd(const Tensor& x) {
  auto out = MaxPool2x2Function::apply(x);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseticket, Autograd, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_autograd<false>);
  m.impl("sparse_conv2d_relu", &sparse_conv2d_autograd<true>);
  m.impl("max_pool2x2", &max_pool2x2_autograd);
}

}  // namespace sparseticket
