// SPDX-License-Identifier: Apache-2.0
// The pybind11 module: non-tensor utilities only. Ops are registered through torch.library
// by static registrars in registration.cpp and the per-device files.
//
// One deliberate exception to STYLE.md section 3: ServingModel, the serving executor's entry
// point, numpy buffers in and out. At one candidate the kernel takes ~10 us, and calling it as
// torch.ops.adrec.serving_forward adds ~3 us of dispatch (schema matching, boxing) and ~2 us of
// torch.from_numpy / .numpy() per request (bench/RESULTS_serving.md); a serving stack calls it
// from Python with numpy arrays and needs neither autograd nor torch.compile there. The op stays
// registered (fake kernel, opcheck, torch.compile) and both paths run the same checks and the
// same kernel (csrc/cpu/scorer.h). No tensor crosses this boundary: the handle takes numpy views
// of the packed model's tensors and keeps them alive.
#include <c10/util/Exception.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/cpu_isa.h"
#include "common/dynamic_table.h"
#include "common/linear.h"
#include "common/parallel.h"
#include "common/tuning.h"
#include "cpu/scorer.h"
#include "py_describe.h"
#include "request_encoder.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifndef ADREC_TORCH_VERSION
#define ADREC_TORCH_VERSION "unknown"
#endif

namespace py = pybind11;

namespace {

// c10 errors of the kernel's checks -> the Python exception torch.ops would raise.
template <class F>
auto translate_errors(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::IndexError& e) {
    throw py::index_error(e.what_without_backtrace());
  } catch (const c10::ValueError& e) {
    throw py::value_error(e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    throw py::type_error(e.what_without_backtrace());
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

using adrec::describe;

// `obj` as a C-contiguous numpy array of T with `ndim` dims (copied only when it is strided);
// a TypeError / ValueError naming the argument otherwise. The result owns what data() points to.
template <class T>
py::array_t<T> array_arg(py::handle obj, const char* name, py::ssize_t ndim, const char* shape) {
  if (!py::isinstance<py::array_t<T>>(obj))
    throw py::type_error(std::string("ServingModel: ") + name + " must be a numpy " +
                         py::str(py::dtype::of<T>()).cast<std::string>() + " array " + shape +
                         ", got " + describe(obj));
  auto a = py::reinterpret_borrow<py::array_t<T>>(obj);
  if (a.ndim() != ndim)
    throw py::value_error(std::string("ServingModel: ") + name + " must be " + shape + ", got " +
                          describe(obj));
  if (!(a.flags() & py::array::c_style)) a = py::array_t<T, py::array::c_style>::ensure(a);
  return a;
}

// A model packed by adrec_fast.serving.scorer.pack over its embedding rows (and first-order
// weights), and the numpy buffers it points into.
class ServingModelHandle {
 public:
  ServingModelHandle(py::handle meta, py::handle blob, py::handle weights, py::handle scale_bias,
                     py::handle lin) {
    auto m = array_arg<int64_t>(meta, "meta", 1, "[H]");
    auto b = array_arg<uint8_t>(blob, "blob", 1, "[bytes]");
    if (!py::isinstance<py::array>(weights))
      throw py::type_error("ServingModel: weights must be a numpy array [R, D], got " +
                           describe(weights));
    auto w = py::reinterpret_borrow<py::array>(weights);
    if (w.ndim() != 2 || !(w.flags() & py::array::c_style))
      throw py::value_error("ServingModel: weights must be a C-contiguous [R, D] array, got " +
                            describe(weights));
    adrec::TableDtype dt;
    if (py::isinstance<py::array_t<float>>(w)) {
      dt = adrec::TableDtype::kFloat32;
    } else if (w.dtype().equal(py::dtype("float16"))) {
      dt = adrec::TableDtype::kFloat16;
    } else if (py::isinstance<py::array_t<uint8_t>>(w)) {
      dt = adrec::TableDtype::kUInt8;
    } else {
      throw py::type_error("ServingModel: weights must be float32, float16 or uint8, got " +
                           describe(weights));
    }
    const float* sb = nullptr;
    if (!scale_bias.is_none()) {
      auto s = array_arg<float>(scale_bias, "scale_bias", 2, "[R, 2]");
      if (s.shape(0) != w.shape(0) || s.shape(1) != 2)
        throw py::value_error("ServingModel: scale_bias must be [R, 2] = [" +
                              std::to_string(w.shape(0)) + ", 2], got " + describe(scale_bias));
      sb = s.data();
      keep_.push_back(std::move(s));
    }
    const float* pl = nullptr;
    if (!lin.is_none()) {
      auto l = array_arg<float>(lin, "lin", 1, "[R]");
      if (l.shape(0) != w.shape(0))
        throw py::value_error("ServingModel: lin must be [R] = [" + std::to_string(w.shape(0)) +
                              "], got " + describe(lin));
      pl = l.data();
      keep_.push_back(std::move(l));
    }
    impl_ = translate_errors([&] {
      return std::make_unique<adrec::ServingModel>(m.data(), m.size(), b.data(), b.size(),
                                                   w.data(), dt, w.shape(0), w.shape(1), sb, pl);
    });
    keep_.push_back(std::move(m));
    keep_.push_back(std::move(b));
    keep_.push_back(std::move(w));
  }

  // user_ids int64 [Tu] (or [T]), cand_ids int64 [N, Tc], dense float32 [Kd] or [Nd, Kd] (None
  // when Kd = 0), seq_ids int64 [sum L] and seq_lengths int64 [S] (None when S = 0) ->
  // probabilities float32 [N]. The GIL is released while the kernel runs.
  py::array_t<float> operator()(py::handle user_ids, py::handle cand_ids, py::handle dense,
                                py::handle seq_ids, py::handle seq_lengths) const {
    const auto u = array_arg<int64_t>(user_ids, "user_ids", 1, "[Tu]");
    const auto c = array_arg<int64_t>(cand_ids, "cand_ids", 2, "[N, Tc]");
    const int64_t Tc = impl_->num_cand(), Kd = impl_->num_dense(), S = impl_->num_seq();
    if (c.shape(1) != Tc)
      throw py::value_error("ServingModel: cand_ids must be [N, " + std::to_string(Tc) +
                            "], got " + describe(cand_ids));
    py::array_t<float> d;
    const float* pd = nullptr;
    int64_t Nd = 1;
    if (Kd > 0 && dense.is_none())
      throw py::value_error("ServingModel: dense values needed: dense must be float32 [" +
                            std::to_string(Kd) + "], got None");
    if (!dense.is_none()) {
      const bool one = py::isinstance<py::array>(dense) &&
                       py::reinterpret_borrow<py::array>(dense).ndim() == 1;
      d = one ? array_arg<float>(dense, "dense", 1, "[Kd]")
              : array_arg<float>(dense, "dense", 2, "[Nd, Kd]");
      if (d.shape(d.ndim() - 1) != Kd)
        throw py::value_error("ServingModel: dense must be [" + std::to_string(Kd) +
                              "] or [N, " + std::to_string(Kd) + "], got " + describe(dense));
      Nd = one ? 1 : d.shape(0);
      pd = d.data();
    }
    py::array_t<int64_t> q, ql;
    const int64_t *pq = nullptr, *pql = nullptr;
    if (S > 0) {
      if (seq_ids.is_none() || seq_lengths.is_none())
        throw py::value_error("ServingModel: the model reads " + std::to_string(S) +
                              " behaviour histories: pass seq_ids and seq_lengths");
      q = array_arg<int64_t>(seq_ids, "seq_ids", 1, "[sum L]");
      ql = array_arg<int64_t>(seq_lengths, "seq_lengths", 1, "[S]");
      int64_t tot = 0;
      for (int64_t s = 0; s < ql.shape(0); ++s) tot += std::max<int64_t>(ql.data()[s], 0);
      if (ql.shape(0) != S || q.shape(0) != tot)
        throw py::value_error("ServingModel: seq_lengths must be [" + std::to_string(S) +
                              "] and sum to the length of seq_ids, got " + describe(seq_lengths) +
                              " and " + describe(seq_ids));
      pq = q.data(), pql = ql.data();
    }
    const int64_t N = c.shape(0);
    py::array_t<float> out(N);
    float* po = out.mutable_data();
    translate_errors([&] {
      py::gil_scoped_release nogil;
      impl_->score(u.data(), u.shape(0), c.data(), N, pd, Nd, pq, pql, po);
    });
    return out;
  }

  const adrec::ServingModel& impl() const { return *impl_; }

 private:
  std::vector<py::object> keep_;  // the buffers impl_ points into
  std::unique_ptr<adrec::ServingModel> impl_;
};

// The Scorer's raw-value request path in one native call: the version's RequestEncoder turns
// the request into ids and dense values (request_encoder.cpp), the model packed for the
// request's field split runs it (packed on first use by the Python callback `pack`, which
// returns its ServingModel), and the probabilities come back; the GIL is released while the
// model runs. The map of packed models is read and written with the GIL held (encoding needs it
// anyway), so it needs no lock of its own.
class ServingFront {
 public:
  ServingFront(py::object encoder, py::object pack) : encoder_(std::move(encoder)),
                                                      pack_(std::move(pack)) {}

  py::array_t<float> score(py::handle user, py::handle candidates) {
    thread_local adrec::EncodedBuffers b;  // reused from request to request
    adrec::encode_request(encoder_, user, candidates, b);
    const adrec::ServingModel& m = model_for(b);
    py::array_t<float> out(b.n);
    float* po = out.mutable_data();
    translate_errors([&] {
      py::gil_scoped_release nogil;
      m.score(b.user_ids.data(), static_cast<int64_t>(b.user_ids.size()), b.cand_ids.data(),
              b.n, b.dense.empty() ? nullptr : b.dense.data(), b.Nd, b.seq_ids.data(),
              b.seq_lengths.data(), po);
    });
    return out;
  }

  size_t num_packed() const { return models_.size(); }

 private:
  const adrec::ServingModel& model_for(const adrec::EncodedBuffers& b) {
    key_.assign(b.cand_slots.begin(), b.cand_slots.end());
    key_.push_back(-1);
    key_.insert(key_.end(), b.dense_cand.begin(), b.dense_cand.end());
    auto it = models_.find(key_);
    if (it == models_.end()) {
      py::tuple cs(b.cand_slots.size()), dc(b.dense_cand.size());
      for (size_t i = 0; i < b.cand_slots.size(); ++i) cs[i] = py::int_(b.cand_slots[i]);
      for (size_t i = 0; i < b.dense_cand.size(); ++i) dc[i] = py::int_(b.dense_cand[i]);
      py::object h = pack_(cs, dc);
      h.cast<const ServingModelHandle&>();  // a TypeError here, not a crash later
      it = models_.emplace(key_, std::move(h)).first;
    }
    return it->second.cast<const ServingModelHandle&>().impl();
  }

  py::object encoder_, pack_;
  std::map<std::vector<int64_t>, py::object> models_;  // field split -> its ServingModel
  std::vector<int64_t> key_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "adrec_fast native core";
  // Resolve ADREC_CPU_ISA and ADREC_THREADS now, so that a bad value fails the import with its
  // message rather than the first kernel call.
  try {
    adrec::cpu_isa();
    adrec::kernels_on_openmp();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  adrec::bind_request_encoder(m);  // request_encoder.cpp: raw serving values -> ids
  adrec::bind_dynamic_table(m);  // cpu/dynamic_table.cpp: raw keys -> rows of a dynamic table
  // What the CPU kernels use in this process: the ISA level (common/cpu_isa.h) and the
  // thresholds derived from the machine (common/tuning.h).
  m.def("runtime_info", [] {
    py::dict d;
    d["cpu_isa"] = std::string(adrec::isa_name(adrec::cpu_isa()));
    d["cpu_isa_supported"] = std::string(adrec::isa_name(adrec::cpu_isa_supported()));
    d["avx512_bf16"] = adrec::cpu_has_avx512_bf16();
    d["l3_bytes"] = adrec::tuning::l3_bytes();
    auto& t = adrec::tuning::thresholds();
    d["stream_out_bytes"] = t.stream_out_bytes.load();
    d["direct_min_bytes"] = t.direct_min_bytes.load();
    d["pool_spin_us"] = t.pool_spin_ns.load() / 1000;
    d["threads"] = std::string(adrec::kernels_on_openmp() ? "openmp" : "pool");
    return d;
  });
  // Tests only: the kernels' thread pool (common/parallel.h) without a kernel around it.
  // parallel_for over [0, n) -> how often each index was visited.
  m.def("_pool_for", [](int64_t n, int64_t grain) {
    std::vector<std::atomic<int32_t>> seen(static_cast<size_t>(std::max<int64_t>(n, 0)));
    {
      py::gil_scoped_release nogil;
      adrec::parallel_for(0, n, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t i = b0; i < b1; ++i) seen[i].fetch_add(1);
      });
    }
    py::list out;
    for (auto& v : seen) out.append(v.load());
    return out;
  });
  // parallel_items over n items, item `bad` throwing: the error must reach the caller.
  m.def("_pool_throw", [](int64_t n, int64_t bad) {
    py::gil_scoped_release nogil;
    adrec::parallel_items(n, [&](int64_t i) {
      if (i == bad) throw std::runtime_error("task " + std::to_string(i) + " failed");
    });
  });
  // Tests only: lowers a threshold so that a small input reaches the path it guards
  // (stream_out_bytes, direct_min_bytes: bytes, 0 = never; pool_spin_us: microseconds).
  m.def("_set_tuning", [](py::kwargs kw) {
    auto& t = adrec::tuning::thresholds();
    for (auto item : kw) {
      const std::string k = py::str(item.first);
      const int64_t v = py::cast<int64_t>(item.second);
      const int64_t bytes = v > 0 ? v : std::numeric_limits<int64_t>::max();
      if (k == "stream_out_bytes") t.stream_out_bytes.store(bytes);
      else if (k == "direct_min_bytes") t.direct_min_bytes.store(bytes);
      else if (k == "pool_spin_us") t.pool_spin_ns.store(std::max<int64_t>(v, 0) * 1000);
      else
        throw py::value_error("_set_tuning: unknown setting '" + k +
                              "' (stream_out_bytes, direct_min_bytes, pool_spin_us)");
    }
  });
  // Asks the kernel to back the 2 MiB-aligned interior of [address, address + nbytes) with
  // transparent huge pages (madvise MADV_HUGEPAGE; Linux only). Call it on a fresh allocation
  // before its first write. A pooled lookup reads random rows of a table of hundreds of MB: with
  // 4 KiB pages nearly every row costs a TLB miss and a page walk. Returns whether the advice
  // was taken; it never changes what the memory holds.
  m.def(
      "advise_huge_pages",
      [](std::uintptr_t address, std::size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        constexpr std::uintptr_t kHuge = std::uintptr_t(1) << 21;
        const std::uintptr_t a = (address + kHuge - 1) & ~(kHuge - 1);
        const std::uintptr_t e = (address + nbytes) & ~(kHuge - 1);
        if (e <= a) return false;
        return madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE) == 0;
#else
        (void)address;
        (void)nbytes;
        return false;
#endif
      },
      py::arg("address"), py::arg("nbytes"));
  py::class_<ServingModelHandle>(m, "ServingModel",
                                 "A packed model for numpy requests (csrc/cpu/scorer.h): "
                                 "ServingModel(meta, blob, weights, scale_bias, lin) takes numpy "
                                 "views of pack's meta / blob, the embedding rows and the "
                                 "first-order weights; calling it with (user_ids, cand_ids, "
                                 "dense, seq_ids, seq_lengths) returns probabilities [N].")
      .def(py::init<py::handle, py::handle, py::handle, py::handle, py::handle>(),
           py::arg("meta"), py::arg("blob"), py::arg("weights"), py::arg("scale_bias") = py::none(),
           py::arg("lin") = py::none())
      .def("__call__", &ServingModelHandle::operator(), py::arg("user_ids"), py::arg("cand_ids"),
           py::arg("dense") = py::none(), py::arg("seq_ids") = py::none(),
           py::arg("seq_lengths") = py::none())
      .def_property_readonly("num_slots", [](const ServingModelHandle& h) { return h.impl().num_slots(); })
      .def_property_readonly("num_user", [](const ServingModelHandle& h) { return h.impl().num_user(); })
      .def_property_readonly("num_cand", [](const ServingModelHandle& h) { return h.impl().num_cand(); })
      .def_property_readonly("num_dense", [](const ServingModelHandle& h) { return h.impl().num_dense(); })
      .def_property_readonly("num_seq", [](const ServingModelHandle& h) { return h.impl().num_seq(); })
      .def_property_readonly("dense_varies",
                             [](const ServingModelHandle& h) { return h.impl().dense_varies(); });
  py::class_<ServingFront>(m, "ServingFront",
                           "The Scorer's raw-value path in one call: ServingFront(encoder, pack) "
                           "with a _C.RequestEncoder and pack(cand_slots, dense_cand) -> "
                           "ServingModel; score(user, candidates) -> probabilities [N].")
      .def(py::init<py::object, py::object>(), py::arg("encoder"), py::arg("pack"))
      .def("score", &ServingFront::score, py::arg("user"), py::arg("candidates"))
      .def_property_readonly("num_packed", &ServingFront::num_packed);
  // The width at which a model stores activations of k columns (common/linear.h); the policy
  // behind it is linear.cpp's.
  m.def(
      "gemm_width",
      [](int64_t k, int64_t rows, bool float32) {
        return adrec::gemm_width(k, float32 ? at::kFloat : at::kBFloat16, rows);
      },
      py::arg("k"), py::arg("rows"), py::arg("float32"));
  m.def("build_info", [] {
    py::dict d;
    d["torch"] = std::string(ADREC_TORCH_VERSION);
#ifdef ADREC_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["compiler"] = std::string(__VERSION__);
    return d;
  });
}
