// SPDX-License-Identifier: Apache-2.0
// Autograd for adrec::fm_interaction, in C++ (one kernel for every device: it redispatches to
// the device kernels of fm_interaction and fm_interaction_bwd below autograd).
//
// Why C++ and not `torch.library.register_autograd` (STYLE.md §3): at the benchmark shape
// (B = 4096, F = 27, D = 16) the whole forward + backward takes ~0.2 ms, and the Python autograd
// wrapper's ~25 us was the margin between this op and torch.compile of the reference. See
// bench/RESULTS_interaction.md. The fake kernels stay in Python (adrec_fast/ops/fm_interaction.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace adrec {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_fm(const at::Tensor& emb) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("adrec::fm_interaction", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return op.call(emb);
}

at::Tensor call_fm_bwd(const at::Tensor& grad_out, const at::Tensor& emb) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("adrec::fm_interaction_bwd", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_out, emb);
}

// emb [B, F, D] -> [B, 1]; the backward is fm_interaction_bwd(grad_out, emb).
class FmInteractionFunction : public torch::autograd::Function<FmInteractionFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& emb) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({emb});
    return call_fm(emb);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {call_fm_bwd(grads[0], saved[0])};
  }
};

at::Tensor fm_interaction_autograd(const at::Tensor& emb) {
  return FmInteractionFunction::apply(emb);
}

}  // namespace

TORCH_LIBRARY_IMPL(adrec, Autograd, m) {
  m.impl("fm_interaction", &fm_interaction_autograd);
}

}  // namespace adrec
