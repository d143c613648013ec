// Version counters for the in-place optimizer ops (masked_sgd_, masked_adamw_).
//
// torch's own in-place ops bump the version counter of every tensor they write (their
// ADInplaceOrView kernel); autograd compares a saved tensor's version at backward time
// against the one it saved, and so refuses a backward through weights an optimizer step
// has already changed. torch gives an op defined outside it no such kernel (its
// ADInplaceOrView key falls through), so without these the optimizers' updates were
// invisible to that check, unlike torch.optim's and unlike the reference kernels (which
// write with torch's in-place ops). Each kernel runs the op below this key, then bumps
// every tensor of the lists the schema marks as written (Tensor(a!)[]), whatever the
// masks left unchanged: torch bumps on any in-place write to a tensor.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

namespace sparseticket {
namespace {

using at::Tensor;
using at::TensorList;
using OptTensors = c10::List<c10::optional<Tensor>>;

void bump(TensorList ts) {
  for (const Tensor& t : ts) torch::autograd::increment_version(t);
}

// torch refuses an in-place write to an inference tensor outside inference mode; checked
// for every written list before the op runs, so a refused step has written nothing (the
// bump after it would raise only once the update was done)
void check_writable(TensorList ts, const char* name) {
  if (c10::InferenceMode::is_enabled()) return;
  for (const Tensor& t : ts)
    TORCH_CHECK(!t.is_inference(), "sparseticket: ", name,
                " holds an inference tensor (created under torch.inference_mode()); an in-place update of it "
                "outside inference mode is not allowed, as for torch's in-place ops");
}

void masked_sgd_inplace(c10::DispatchKeySet ks, TensorList params, TensorList grads, TensorList bufs,
                        const OptTensors& keeps, const OptTensors& actives, const OptTensors& row_ptrs,
                        c10::List<bool> fresh, double lr, double momentum, double dampening, double weight_decay,
                        bool nesterov, bool maximize) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparseticket::masked_sgd_", "")
                       .typed<void(TensorList, TensorList, TensorList, const OptTensors&, const OptTensors&,
                                   const OptTensors&, c10::List<bool>, double, double, double, double, bool, bool)>();
  check_writable(params, "masked_sgd_: params");
  check_writable(bufs, "masked_sgd_: momentum_buffers");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, params, grads, bufs, keeps, actives, row_ptrs,
                  std::move(fresh), lr, momentum, dampening, weight_decay, nesterov, maximize);
  }
  bump(params);
  bump(bufs);
}

void masked_adamw_inplace(c10::DispatchKeySet ks, TensorList params, TensorList grads, TensorList exp_avgs,
                          TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, const OptTensors& keeps,
                          const OptTensors& actives, const OptTensors& row_ptrs, c10::ArrayRef<double> steps,
                          double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                          bool maximize) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sparseticket::masked_adamw_", "")
                       .typed<void(TensorList, TensorList, TensorList, TensorList, TensorList, const OptTensors&,
                                   const OptTensors&, const OptTensors&, c10::ArrayRef<double>, double, double,
                                   double, double, double, bool, bool)>();
  check_writable(params, "masked_adamw_: params");
  check_writable(exp_avgs, "masked_adamw_: exp_avgs");
  check_writable(exp_avg_sqs, "masked_adamw_: exp_avg_sqs");
  check_writable(max_exp_avg_sqs, "masked_adamw_: max_exp_avg_sqs");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                  keeps, actives, row_ptrs, steps, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize);
  }
  bump(params);
  bump(exp_avgs);
  bump(exp_avg_sqs);
  bump(max_exp_avg_sqs);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseticket, ADInplaceOrView, m) {
  m.impl("masked_sgd_", TORCH_FN(masked_sgd_inplace));
  m.impl("masked_adamw_", TORCH_FN(masked_adamw_inplace));
}

}  // namespace sparseticket
