// SPDX-License-Identifier: Apache-2.0
// Autograd for adrec::sigmoid_bce, in C++ (one kernel for every device: it redispatches to the
// CPU / CUDA kernels below autograd).
//
// Why C++ and not `torch.library.register_autograd` (STYLE.md §3): this op is overhead-bound.
// At B = 4096 its kernel takes a few microseconds, and the Python autograd wrapper cost ~21 us
// per forward + backward, more than eager PyTorch's whole step (~25 us), so the 1.5x target over
// eager could not be reached from Python. See bench/RESULTS_interaction.md. The fake kernel stays
// in Python (adrec_fast/ops/sigmoid_bce.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>

namespace adrec {
namespace {

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

// The backward node, written directly against torch::autograd::Node (as PyTorch's generated
// nodes are) rather than through torch::autograd::Function: the op is overhead-bound, and the
// generic Function's context, saved-variable packing and output wrapping cost about a
// microsecond per step. Gradient: d loss / d logits = grad_loss * grad_logits, where grad_logits
// = (sigmoid(z) - y) w / B came out of the forward pass. Labels and weight are data (no
// gradient), as in the Python op layer.
struct SigmoidBceBackward final : public torch::autograd::Node {
  at::Tensor grad_logits;  // [B], also returned to the caller as the op's second output
  uint32_t version = 0;    // grad_logits' version when saved: in-place changes are an error

  variable_list apply(variable_list&& grads) override {
    TORCH_CHECK(grad_logits.defined(),
                "sigmoid_bce: trying to backward through the graph a second time (or directly "
                "access saved tensors after they have already been freed); pass "
                "retain_graph=True to the first backward");
    TORCH_CHECK(grad_logits._version() == version,
                "sigmoid_bce: its saved gradient (the op's second output, grad_logits) has been "
                "modified by an in-place operation (version ", grad_logits._version(),
                ", expected ", version, ")");
    if (!grads[0].defined()) return {at::Tensor()};
    // loss.backward() seeds the gradient with 1: then grad_logits is the answer as it is (the
    // engine releases this node's reference after apply, so AccumulateGrad can take the buffer).
    if (is_cpu_one(grads[0])) return {grad_logits};
    return {grads[0] * grad_logits};
  }
  std::string name() const override { return "SigmoidBceBackward"; }
  void release_variables() override { grad_logits.reset(); }
};

// torch >= 2.12 holds autograd nodes in c10::intrusive_ptr, earlier versions in std::shared_ptr;
// the Edge's member type says which (the condition depends on R so that only the branch for the
// installed torch is compiled).
using NodeRef = decltype(torch::autograd::Edge::function);
template <typename T, typename R = NodeRef>
R make_node() {
  if constexpr (std::is_same_v<R, std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<T>(new T());
  } else {
    return c10::make_intrusive<T>();
  }
}

std::tuple<at::Tensor, at::Tensor> sigmoid_bce_autograd(const at::Tensor& logits,
                                                        const at::Tensor& labels,
                                                        const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(!logits._fw_grad(/*level=*/0).defined(),
              "sigmoid_bce: forward-mode AD is not implemented (logits has a tangent)");
  std::tuple<at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = call_sigmoid_bce(logits, labels, weight);
  }
  if (torch::autograd::compute_requires_grad(logits)) {
    auto node = make_node<SigmoidBceBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(logits));
    auto* n = static_cast<SigmoidBceBackward*>(node.get());
    n->grad_logits = std::get<1>(out);
    n->version = n->grad_logits._version();
    torch::autograd::set_history(std::get<0>(out), node);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(adrec, Autograd, m) {
  m.impl("sigmoid_bce", &sigmoid_bce_autograd);
}

}  // namespace adrec
