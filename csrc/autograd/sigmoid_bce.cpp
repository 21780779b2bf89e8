// SPDX-License-Identifier: Apache-2.0
// Autograd for adrec::sigmoid_bce, in C++ (one kernel for every device: it redispatches to the
// CPU / CUDA kernels below autograd).
//
// Why C++ and not `torch.library.register_autograd` (STYLE.md §3): this op is overhead-bound.
// At B = 4096 its kernel takes a few microseconds, and the Python autograd wrapper cost ~21 us
// per forward + backward, more than eager PyTorch's whole step (~25 us), so the 1.5x over
// eager could not be reached from Python. See bench/RESULTS_interaction.md. The fake kernel stays
// in Python (adrec_fast/ops/sigmoid_bce.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace adrec {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_sigmoid_bce(const at::Tensor& logits,
                                                    const at::Tensor& labels,
                                                    const std::optional<at::Tensor>& weight) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("adrec::sigmoid_bce", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&)>();
  return op.call(logits, labels, weight);
}

// Whether g is a plain CPU scalar equal to 1, read without a dispatched op (.item() would be
// one). Anything else (fake / functional / batched tensors, an active dispatch mode: tracing
// for torch.compile) answers false, so a traced graph always keeps the multiplication.
bool is_cpu_one(const at::Tensor& g) {
  if (!g.defined() || g.numel() != 1 || c10::impl::dispatch_mode_enabled()) return false;
  const auto plain = g.key_set() - c10::autograd_dispatch_keyset_with_ADInplaceOrView;
  if (plain != c10::DispatchKeySet(c10::DispatchKey::CPU) || !g.has_storage() ||
      g.const_data_ptr() == nullptr)
    return false;
  switch (g.scalar_type()) {
    case at::kFloat: return *g.const_data_ptr<float>() == 1.0f;
    case at::kDouble: return *g.const_data_ptr<double>() == 1.0;
    default: return false;
  }
}

// Outputs: loss [] and grad_logits [B] = (sigmoid(z) - y) w / B, the loss's gradient from the
// same pass, returned for the backward and not differentiable itself.
class SigmoidBceFunction : public torch::autograd::Function<SigmoidBceFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& labels, const std::optional<at::Tensor>& weight) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad_logits] = call_sigmoid_bce(logits, labels, weight);
    ctx->save_for_backward({grad_logits});
    ctx->mark_non_differentiable({grad_logits});
    ctx->set_materialize_grads(false);
    return {loss, grad_logits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Gradients flow to the logits only (labels and weight are data, as in the Python op layer).
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    auto saved = ctx->get_saved_variables();
    // loss.backward() seeds the gradient with 1: then grad_logits is the answer as it is (the
    // engine releases the saved copy after this call, so AccumulateGrad can take the buffer).
    if (is_cpu_one(grads[0])) return {std::move(saved[0]), at::Tensor(), at::Tensor()};
    return {grads[0] * saved[0], at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> sigmoid_bce_autograd(const at::Tensor& logits,
                                                        const at::Tensor& labels,
                                                        const std::optional<at::Tensor>& weight) {
  auto out = SigmoidBceFunction::apply(logits, labels, weight);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(adrec, Autograd, m) {
  m.impl("sigmoid_bce", &sigmoid_bce_autograd);
}

}  // namespace adrec
