// The op sequence of sparseticket.nn.MLPStep._step in one C++ call.
//
// MLPStep computes a (sparse) MLP's cross-entropy loss and gradients by calling, in
// autograd's order, the ops autograd would call. From Python each of those ~25 calls
// pays 2-4 us of binding and dispatch, a third of a LeNet-300-100 step at 3-10% density
// on the project's VMs, where each op does only a few microseconds of arithmetic. Here
// the same ATen functions and sparseticket ops run in the same order on the same
// tensors, so the results are bit-identical to the Python sequence (and so to autograd);
// tests/test_fast_step.py runs both against autograd.
//
// Layers are described positionally (kSlots tensors and kSpec integers each) so that
// one call carries any mix of layer kinds without a Python object per layer.
//
// With an SGD plan (MLPStep.step with a MaskedSGD), each layer's masked_sgd_ update runs
// as soon as the backward is done with the layer (its gradients formed, its weight used
// for the input gradient), while its weight and gradient are still in cache, instead of
// once for all layers after the backward. Each entry's update is the same arithmetic on
// the same numbers, so the result is bit-identical to the gradients followed by the
// optimizer's step.
#include <ATen/ATen.h>
#include <torch/extension.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "op_calls.h"

namespace sparseticket {
namespace {

using at::Tensor;
using namespace calls;

// per layer: how its forward forms y (must match MLPStep's Python _step)
enum Kind : int64_t {
  kSparse = 0,       // sparse_linear(_relu) on the ticket
  kExpand = 1,       // F.linear with the ticket expanded through its bitmap (SparseLinear, dense path)
  kView = 2,         // F.linear with the values viewed as W (a full ticket, dense path)
  kPlain = 3,        // F.linear with an nn.Linear's weight
  kNeq = 4,          // neq_linear with a DenseNEqLinear's weight and active mask (slot 2)
};
// tensor slots per layer: weight or values, bias, crow, col, ccol, row, perm, bits (a kNeq
// layer: weight, bias, active)
constexpr size_t kSlots = 8;
// integers per layer: kind, relu, out_features, in_features
constexpr size_t kSpec = 4;
// SGD plan, per layer: the momentum buffer, keep, active and row_ptr of its weight, then
// of its bias (a buffer is undefined without momentum, a bias's slots without a bias) ...
constexpr size_t kSgdSlots = 8;
// ... and the update's scalars: lr, momentum, dampening, weight_decay, nesterov, maximize,
// then when: 1 right after the layer's backward, 0 after the whole backward, in one call
// with the other such layers (a small layer gains nothing from its cache and would pay
// one more op call)
constexpr size_t kSgdHyper = 7;
constexpr int64_t kMean = 1;       // at::Reduction::Mean
constexpr int64_t kIgnore = -100;  // F.cross_entropy's default ignore_index

// t and spec describe whole layers (kSlots tensors and kSpec integers each, at least one)
void check_layers(const std::vector<c10::optional<Tensor>>& t, const std::vector<int64_t>& spec, const char* fn) {
  TORCH_CHECK(spec.size() % kSpec == 0 && t.size() == spec.size() / kSpec * kSlots && !spec.empty(),
              "sparseticket: ", fn, ": ", t.size(), " tensors and ", spec.size(), " spec entries do not describe layers");
}

const Tensor& need(const std::vector<c10::optional<Tensor>>& t, size_t i, const char* what) {
  TORCH_CHECK(t[i].has_value() && t[i]->defined(), "sparseticket: mlp: layer ", i / kSlots, " has no ", what);
  return *t[i];
}

// masked_sgd_ on the parameters of `layers` (one call; their scalars must be equal) with
// the gradients just formed, through the dispatcher as MaskedSGD's step calls it (below
// Autograd; the ADInplaceOrView kernel bumps the parameters' version counters)
void sgd_update(const std::vector<size_t>& layers, const std::vector<c10::optional<Tensor>>& t,
                const std::vector<Tensor>& out, const std::vector<c10::optional<Tensor>>& sgd,
                const std::vector<double>& hyper) {
  if (layers.empty()) return;
  const double* h = hyper.data() + layers[0] * kSgdHyper;
  std::vector<Tensor> params, grads, bufs;
  c10::List<c10::optional<Tensor>> keeps, actives, row_ptrs;
  c10::List<bool> fresh;
  for (size_t l : layers) {
    for (size_t j = 0; j < 2; ++j) {
      const c10::optional<Tensor>& p = t[l * kSlots + j];
      if (!p.has_value() || !p->defined()) continue;
      const c10::optional<Tensor>* s = sgd.data() + l * kSgdSlots + 4 * j;
      params.push_back(*p);
      grads.push_back(out[1 + 2 * l + j]);
      if (h[1] != 0) {
        TORCH_CHECK(s[0].has_value() && s[0]->defined(), "sparseticket: mlp_grads: layer ", l,
                    " has momentum but no momentum buffer");
        bufs.push_back(*s[0]);
      }
      keeps.push_back(s[1]);
      actives.push_back(s[2]);
      row_ptrs.push_back(s[3]);
      fresh.push_back(false);
    }
  }
  if (params.empty()) return;
  at::AutoDispatchBelowAutograd below;
  call_masked_sgd_(params, grads, bufs, keeps, actives, row_ptrs, std::move(fresh), h[0], h[1], h[2], h[3], h[4] != 0,
                   h[5] != 0);
}

// The layers' forward: acts[0] = x, acts[l + 1] = layer l's output (after its ReLU);
// dense_w[l] = the [out, in] weight a dense-path layer multiplied by (undefined for a
// sparse layer).
struct Pass {
  std::vector<Tensor> acts, dense_w;
};

Pass forward_layers(const Tensor& x, const std::vector<c10::optional<Tensor>>& t, const std::vector<int64_t>& spec) {
  const size_t L = spec.size() / kSpec;
  Pass p;
  p.acts.reserve(L + 1);
  p.acts.push_back(x);
  p.dense_w.resize(L);
  Tensor h = x;
  for (size_t l = 0; l < L; ++l) {
    const int64_t kind = spec[l * kSpec], relu = spec[l * kSpec + 1];
    const Tensor& w = need(t, l * kSlots, "weight");
    const c10::optional<Tensor>& bias = t[l * kSlots + 1];
    if (kind == kSparse) {
      const Tensor &crow = need(t, l * kSlots + 2, "crow"), &col = need(t, l * kSlots + 3, "col"),
                   &ccol = need(t, l * kSlots + 4, "ccol"), &row = need(t, l * kSlots + 5, "row"),
                   &perm = need(t, l * kSlots + 6, "perm");
      h = relu ? call_sparse_linear_relu(h, w, crow, col, ccol, row, perm, bias, c10::nullopt)
               : call_sparse_linear(h, w, crow, col, ccol, row, perm, bias, c10::nullopt);
    } else if (kind == kNeq) {
      h = call_neq_linear(h, w, bias, t[l * kSlots + 2]);
      if (relu) h = at::relu(h);
      p.dense_w[l] = w;
    } else {
      const int64_t out = spec[l * kSpec + 2], in = spec[l * kSpec + 3];
      Tensor W;
      if (kind == kExpand) {
        W = call_ticket_expand(w, need(t, l * kSlots + 2, "crow"), need(t, l * kSlots + 7, "bits"), in);
      } else if (kind == kView) {
        W = w.view({out, in});
      } else {
        TORCH_CHECK(kind == kPlain, "sparseticket: mlp: layer ", l, " has unknown kind ", kind);
        W = w;
      }
      h = at::linear(h, W, bias);
      if (relu) h = at::relu(h);
      p.dense_w[l] = W;
    }
    p.acts.push_back(h);
  }
  return p;
}

// The layers' backward from g, the gradient of the last output, in autograd's order and
// with its ops: layer l's weight (values) and bias gradients go to out[first + 2l] and
// out[first + 2l + 1] (the bias's undefined without a bias); `done(l)` runs as soon as
// layer l's gradients are formed and its weight used. Returns the input's gradient when
// need_gx, else an undefined tensor.
template <class Done>
Tensor backward_layers(Tensor g, const Pass& p, const std::vector<c10::optional<Tensor>>& t,
                       const std::vector<int64_t>& spec, bool need_gx, std::vector<Tensor>& out, size_t first,
                       Done done) {
  const size_t L = spec.size() / kSpec;
  for (size_t i = L; i-- > 0;) {
    const int64_t kind = spec[i * kSpec], relu = spec[i * kSpec + 1];
    const Tensor& w = *t[i * kSlots];
    const bool has_bias = t[i * kSlots + 1].has_value() && t[i * kSlots + 1]->defined();
    const bool want_gx = i > 0 || need_gx;
    if (kind == kSparse) {
      // what autograd's SparseLinear(Relu)Function::backward calls (csrc/autograd.cpp)
      Tensor gx, gb;
      std::tie(gx, out[first + 2 * i], gb) = call_sparse_linear_backward(
          g.contiguous(), relu ? c10::optional<Tensor>(p.acts[i + 1]) : c10::nullopt, p.acts[i], w,
          *t[i * kSlots + 2], *t[i * kSlots + 3], *t[i * kSlots + 4], *t[i * kSlots + 5], *t[i * kSlots + 6],
          c10::nullopt, want_gx);
      if (has_bias) out[first + 2 * i + 1] = gb;
      g = want_gx ? gx : Tensor();
      done(i);
      continue;
    }
    if (relu) g = at::threshold_backward(g, p.acts[i + 1], 0);
    if (kind == kNeq) {  // what autograd's NeqLinearFunction::backward computes
      const NeqGrads n = neq_linear_grads(g.contiguous(), p.acts[i], w, t[i * kSlots + 2], want_gx, true, has_bias);
      out[first + 2 * i] = n.gw;
      if (has_bias) out[first + 2 * i + 1] = n.gb;
      g = n.gx;
      done(i);
      continue;
    }
    // (g as it comes, as autograd's addmm backward takes it: a strided g sums differently)
    // addmm(bias, h, W.t())'s backward forms (gᵀ h)ᵀ for the column-major W.t(); its
    // transpose back is gᵀ h
    const Tensor gw = g.t().mm(p.acts[i]);
    out[first + 2 * i] = kind == kExpand ? call_ticket_compress(gw, *t[i * kSlots + 2], *t[i * kSlots + 7], w.size(0))
                         : kind == kView ? gw.view(-1)
                                         : gw;
    if (has_bias) out[first + 2 * i + 1] = g.sum(0);
    g = want_gx ? g.mm(p.dense_w[i]) : Tensor();
    done(i);  // (after g.mm: a full ticket's W is a view of the values an update may change)
  }
  return g;
}

// Returns [loss, then per layer: weight (values) gradient, bias gradient or undefined].
// With `sgd` and `hyper` (kSgdSlots tensors and kSgdHyper scalars per layer) it also
// applies each layer's SGD update (see the top of the file).
std::vector<Tensor> mlp_grads(const Tensor& x, const Tensor& y, const std::vector<c10::optional<Tensor>>& t,
                              const std::vector<int64_t>& spec, const std::vector<c10::optional<Tensor>>& sgd,
                              const std::vector<double>& hyper) {
  check_layers(t, spec, "mlp_grads");
  const size_t L = spec.size() / kSpec;
  const bool update = !hyper.empty();
  TORCH_CHECK(!update || (sgd.size() == L * kSgdSlots && hyper.size() == L * kSgdHyper),
              "sparseticket: mlp_grads: an SGD plan needs ", kSgdSlots, " tensors and ", kSgdHyper,
              " scalars per layer, got ", sgd.size(), " and ", hyper.size(), " for ", L, " layers");
  // the deferred layers' updates go in one call: their scalars must agree
  for (size_t l = 0, first = L; update && l < L; ++l) {
    if (hyper[l * kSgdHyper + 6] != 0) continue;
    if (first == L) first = l;
    // (bitwise: a NaN setting equals itself, as the optimizer's one call would take it)
    TORCH_CHECK(std::memcmp(hyper.data() + l * kSgdHyper, hyper.data() + first * kSgdHyper,
                            kSgdHyper * sizeof(double)) == 0,
                "sparseticket: mlp_grads: layers ", first, " and ", l, " are updated after the backward in one call ",
                "but have different SGD settings");
  }
  // the update needs grad mode off, as an optimizer step runs (MLPStep holds torch.no_grad)
  TORCH_CHECK(!update || !c10::GradMode::is_enabled(), "sparseticket: mlp_grads: an SGD plan needs grad mode off");
  // no autograd graph (as under torch.no_grad, which MLPStep holds as well): the
  // parameters require grad, but nothing here is differentiated. (Optional: the SGD
  // updates leave it to bump version counters.)
  c10::optional<at::AutoDispatchBelowADInplaceOrView> guard;
  guard.emplace();
  std::vector<Tensor> out(1 + 2 * L);
  std::vector<size_t> later;  // layers updated after the whole backward
  auto update_now = [&](size_t l) {
    if (hyper[l * kSgdHyper + 6] == 0) {
      later.push_back(l);
      return;
    }
    guard.reset();
    sgd_update({l}, t, out, sgd, hyper);
    guard.emplace();
  };
  const Pass pass = forward_layers(x, t, spec);
  const Tensor& h = pass.acts.back();
  // F.cross_entropy and its backward, op for op as autograd runs them
  const Tensor logp = at::log_softmax(h, 1);
  Tensor loss, total_weight;
  std::tie(loss, total_weight) = at::nll_loss_forward(logp, y, {}, kMean, kIgnore);
  Tensor g = at::nll_loss_backward(at::ones_like(loss), logp, y, {}, kMean, kIgnore, total_weight);
  g = at::_log_softmax_backward_data(g, logp, 1, logp.scalar_type());
  out[0] = loss;
  backward_layers(g, pass, t, spec, /*need_gx=*/false, out, 1, [&](size_t i) {
    if (update) update_now(i);
  });
  guard.reset();
  if (update) sgd_update(later, t, out, sgd, hyper);
  return out;
}

// An MLP's forward as one autograd node (sparsify(fuse_relu=True)'s chain forward of an
// nn.Sequential, sparseticket/nn/fast_step.py): the layers' forward ops, below autograd,
// and in its backward the same ops the per-layer nodes' backward would run, in the same
// order, so outputs and gradients are bit-identical to the module-by-module forward.
// `params` are the differentiable inputs (per layer its weight or values, then its bias
// if any), `t` and `spec` the layers as mlp_grads takes them.
class MLPChainFunction : public torch::autograd::Function<MLPChainFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, at::TensorList params,
                        const std::vector<c10::optional<Tensor>>& t, const std::vector<int64_t>& spec) {
    check_layers(t, spec, "mlp_chain");
    const size_t L = spec.size() / kSpec;
    std::vector<int64_t> has_bias(L);
    size_t k = 0;
    for (size_t l = 0; l < L; ++l) {
      has_bias[l] = t[l * kSlots + 1].has_value() && t[l * kSlots + 1]->defined();
      for (size_t j = 0; j < 1 + static_cast<size_t>(has_bias[l]); ++j) {
        const c10::optional<Tensor>& slot = t[l * kSlots + j];
        TORCH_CHECK(k < params.size() && slot.has_value() && params[k].is_same(*slot), "sparseticket: mlp_chain: ",
                    "params must be each layer's weight (values) and then its bias, as in tensors (layer ", l, ")");
        ++k;
      }
    }
    TORCH_CHECK(k == params.size(), "sparseticket: mlp_chain: ", params.size(), " params for ", k,
                " weights and biases");
    Pass p;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      p = forward_layers(x, t, spec);
    }
    // Saved for the backward, and so checked against in-place changes, is what the layers'
    // own nodes save: per layer its weight or values (not a partial ticket's on its dense
    // path, whose expanded W is saved instead) and index tensors, never a bias; then the
    // activations (the output only when the last layer's ReLU needs it: otherwise the
    // caller may change it in place before the backward, as with the layers' nodes); then
    // the dense weights. The parameters themselves are kept by reference (saved_data).
    std::vector<Tensor> saved;
    saved.reserve(t.size() + 2 * L + 1);
    for (size_t i = 0; i < t.size(); ++i) {
      const size_t l = i / kSlots, j = i % kSlots;
      const bool skip = j == 1 || (j == 0 && spec[l * kSpec] == kExpand);
      saved.push_back(!skip && t[i].has_value() ? *t[i] : Tensor());
    }
    for (size_t i = 0; i <= L; ++i) saved.push_back(i < L || spec[(L - 1) * kSpec + 1] ? p.acts[i] : Tensor());
    for (const auto& w : p.dense_w) saved.push_back(w);
    ctx->save_for_backward(saved);
    ctx->saved_data["spec"] = c10::IValue(spec);
    ctx->saved_data["params"] = c10::IValue(params.vec());
    ctx->saved_data["has_bias"] = c10::IValue(has_bias);
    return p.acts.back();
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const std::vector<Tensor> saved = ctx->get_saved_variables();
    const std::vector<int64_t> spec = ctx->saved_data["spec"].toIntVector();
    const std::vector<Tensor> params = ctx->saved_data["params"].toTensorVector();
    const size_t L = spec.size() / kSpec;
    const bool need_gx = ctx->needs_input_grad(0);
    const std::vector<int64_t> has_bias = ctx->saved_data["has_bias"].toIntVector();
    std::vector<c10::optional<Tensor>> t(L * kSlots);
    for (size_t i = 0; i < L * kSlots; ++i)
      if (saved[i].defined()) t[i] = saved[i];
    std::vector<size_t> weight_at(L);  // layer l's weight (values) is params[weight_at[l]], its bias the next
    for (size_t l = 0, k = 0; l < L; ++l) {  // the slots not saved: from the parameters
      weight_at[l] = k;
      if (!t[l * kSlots].has_value()) t[l * kSlots] = params[k];
      ++k;
      if (has_bias[l]) t[l * kSlots + 1] = params[k++];
    }
    Pass p;
    p.acts.assign(saved.begin() + L * kSlots, saved.begin() + L * kSlots + L + 1);
    p.dense_w.assign(saved.begin() + L * kSlots + L + 1, saved.begin() + L * kSlots + 2 * L + 1);
    torch::autograd::variable_list res;
    res.reserve(1 + params.size() + 2);
    if (c10::GradMode::is_enabled()) {
      // create_graph: the layers run again, recorded this time, from the saved input and
      // the parameters, and their gradient is taken with create_graph, as the layers' own
      // nodes would give it (ops whose backward is not differentiable stay so)
      for (size_t l = 0; l < L; ++l) t[l * kSlots] = params[weight_at[l]];
      const Tensor& x = p.acts[0];
      const Tensor out = forward_layers(x, t, spec).acts.back();
      std::vector<Tensor> inputs;
      if (need_gx) inputs.push_back(x);
      inputs.insert(inputs.end(), params.begin(), params.end());
      const auto g = torch::autograd::grad({out}, inputs, {grad_outputs[0]}, /*retain_graph=*/true,
                                           /*create_graph=*/true, /*allow_unused=*/true);
      res.push_back(need_gx ? g[0] : Tensor());
      res.insert(res.end(), g.begin() + (need_gx ? 1 : 0), g.end());
    } else {
      const BelowAutogradUnlessRecording below;
      std::vector<Tensor> out(2 * L);
      res.push_back(backward_layers(grad_outputs[0], p, t, spec, need_gx, out, 0, [](size_t) {}));
      for (size_t l = 0; l < L; ++l) {
        res.push_back(out[2 * l]);
        if (t[l * kSlots + 1].has_value()) res.push_back(out[2 * l + 1]);
      }
    }
    res.emplace_back();  // t
    res.emplace_back();  // spec
    return res;
  }
};

Tensor mlp_chain(const Tensor& x, const std::vector<Tensor>& params, const std::vector<c10::optional<Tensor>>& t,
                 const std::vector<int64_t>& spec) {
  return MLPChainFunction::apply(x, at::TensorList(params), t, spec);
}

}  // namespace

void register_mlp_step(pybind11::module& m) {
  m.def("mlp_grads", &mlp_grads, pybind11::arg("x"), pybind11::arg("y"), pybind11::arg("tensors"),
        pybind11::arg("spec"), pybind11::arg("sgd") = std::vector<c10::optional<Tensor>>(),
        pybind11::arg("hyper") = std::vector<double>(),
        "MLPStep's loss and gradients in one call: [loss, then per layer weight grad, bias grad or None]; "
        "with an SGD plan (sgd, hyper) each layer's masked_sgd_ update right after its backward.");
  // the layer kinds this build knows (Kind above): a Python package newer than the build
  // leaves the others to the modules
  m.attr("MLP_KINDS") = pybind11::int_(static_cast<int64_t>(kNeq) + 1);
  m.def("mlp_chain", &mlp_chain, pybind11::arg("x"), pybind11::arg("params"), pybind11::arg("tensors"),
        pybind11::arg("spec"),
        "An MLP's forward as one autograd node (layers as mlp_grads takes them; params: per layer its "
        "weight or values, then its bias if any): output and gradients bit-identical to the layers' own.");
}

}  // namespace sparseticket
