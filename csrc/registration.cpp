// SPDX-License-Identifier: Apache-2.0
// Every adrec:: schema, nothing else. Kernels register themselves at the bottom of
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake kernels and autograd live in adrec_fast/ops.
#include <torch/library.h>

TORCH_LIBRARY(adrec, m) {
  // weights [N_total, D]; table_offsets [T+1] row starts; indices [nnz] (row ids within their
  // table); offsets [T*B+1] (FBGEMM TBE layout, table-major); per_sample_weights [nnz];
  // pooling 0=sum 1=mean. Returns [B, T*D].
  m.def(
      "embedding_bag(Tensor weights, Tensor table_offsets, Tensor indices, Tensor offsets, "
      "Tensor? per_sample_weights, int pooling) -> Tensor");
  // Returns (unique_rows [U] int64 global row ids, row_grads [U, D]): only the touched rows.
  m.def(
      "embedding_bag_bwd(Tensor grad_out, Tensor weights, Tensor table_offsets, Tensor indices, "
      "Tensor offsets, Tensor? per_sample_weights, int pooling) -> (Tensor, Tensor)");
  // Backward fused with the optimizer update of the touched rows, in place.
  // optimizer 0 = SGD (state unused), 1 = row-wise Adagrad (state [N_total] float32).
  m.def(
      "embedding_bag_bwd_update(Tensor grad_out, Tensor(a!) weights, Tensor(b!) state, "
      "Tensor table_offsets, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
      "int pooling, int optimizer, float lr, float eps) -> ()");

  // emb [B, F, D] -> [B, 1]
  m.def("fm_interaction(Tensor emb) -> Tensor");
  m.def("fm_interaction_bwd(Tensor grad_out, Tensor emb) -> Tensor");

  // emb [B, F, D] -> [B, P], P = F(F-1)/2 (F(F+1)/2 with self_interaction)
  m.def("dot_interaction(Tensor emb, bool self_interaction) -> Tensor");
  m.def("dot_interaction_bwd(Tensor grad_out, Tensor emb, bool self_interaction) -> Tensor");

  // x [M, K], weight [N, K], bias [N]? -> act(x @ weight.T + bias) [M, N]; activation "none" or
  // "relu". Every dense product of the CPU kernels follows this op's policy (csrc/cpu/linear.cpp).
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor");
  // result: the forward's output (read for "relu"). -> (grad_x [M, K], grad_weight [N, K],
  // grad_bias [N]); an output whose output_mask entry is false is an empty tensor.
  m.def(
      "linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? result, str activation, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // DCN-v2: x0 [B, K], x [B, K], weight [K, K], bias [K] -> (out [B, K], xw [B, K]);
  // out = x0 * xw + x with xw = x @ weight.T + bias (xw is kept for the backward).
  m.def("cross_layer(Tensor x0, Tensor x, Tensor weight, Tensor bias) -> (Tensor, Tensor)");
  // -> (grad_x0, grad_x, grad_weight, grad_bias)
  m.def(
      "cross_layer_bwd(Tensor grad_out, Tensor x0, Tensor x, Tensor weight, Tensor xw) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // One layer's backward inside a cross net's, on buffers the caller owns (g [B, K], gx0 [B, K]):
  // g_xw = g * x0; gx0 = (accumulate ? gx0 : 0) + g * xw (+ g + g_xw @ W if last: x is x0); g
  // becomes g + g_xw @ W, the gradient of x, unless last -> (grad_weight [K, K], grad_bias [K])
  m.def(
      "cross_layer_bwd_(Tensor(a!) g, Tensor(b!) gx0, Tensor x0, Tensor x, Tensor weight, "
      "Tensor xw, bool accumulate, bool last) -> (Tensor, Tensor)");

  // query [B, D], keys [L_total, D], offsets [B+1] -> (out [B, D], probs [L_total])
  m.def("attention_pooling(Tensor query, Tensor keys, Tensor offsets) -> (Tensor, Tensor)");
  // -> (grad_query [B, D], grad_keys [L_total, D])
  m.def(
      "attention_pooling_bwd(Tensor grad_out, Tensor query, Tensor keys, Tensor offsets, "
      "Tensor probs) -> (Tensor, Tensor)");

  // logits [B], labels [B], weight [B]? -> (loss [], grad_logits [B]); the gradient of the mean
  // loss comes out of the same pass, so there is no separate _bwd op.
  m.def("sigmoid_bce(Tensor logits, Tensor labels, Tensor? weight) -> (Tensor, Tensor)");

  // x [B, K], w [K], b [] or [1] -> sigmoid(x @ w + b) [B]
  m.def("score(Tensor x, Tensor w, Tensor b) -> Tensor");

  // x [...] -> x * keep / (1 - p), keep a hash of (seed, offset + element index) (row-major):
  // the backward is the same op on the gradient; offset places x in a larger tensor's mask
  m.def("dropout(Tensor x, float p, int seed, int offset) -> Tensor");
  // the same mask applied in place to a contiguous x
  m.def("dropout_(Tensor(a!) x, float p, int seed, int offset) -> ()");

  // The serving executor (csrc/cpu/scorer.cpp): every zoo model on a model packed once per
  // (checkpoint, field split) by adrec_fast.serving.scorer.pack: meta [H] int64, blob [bytes]
  // uint8; weights [R, D] float32/float16/uint8 (+ scale_bias [R, 2] for uint8: q * scale +
  // bias); lin [R] first-order weights; user_ids [Tu] (or [T]) and cand_ids [N, Tc] int64 ids
  // within their tables; dense [Nd, K_d] float32 (Nd = 1: shared); seq_ids [sum L] with
  // seq_lengths [S]: the user's behaviour histories -> probabilities [N]
  m.def(
      "serving_forward(Tensor meta, Tensor blob, Tensor weights, Tensor? scale_bias, "
      "Tensor? lin, Tensor user_ids, Tensor cand_ids, Tensor dense, Tensor seq_ids, "
      "Tensor seq_lengths) -> Tensor");
}
