// 2-D convolution on CPU through oneDNN, as XLA FFI handlers for jax.ffi.
//
// Three handlers, one per piece of a convolution's training step, each on
// plain NHWC activations and HWIO weights (what flax's nn.Conv holds):
//   collab_onednn_conv_fwd:      y  = conv(x, w)
//   collab_onednn_conv_bwd_data: dx = conv_backward_data(dy, w)
//   collab_onednn_conv_bwd_w:    dw = conv_backward_weights(x, dy)
// Attributes: strides and paddings (top, bottom, left, right); no dilation,
// one feature group, float32. The weights are reordered into the blocked
// layout oneDNN picks (they are small); activations stay NHWC, as PyTorch's
// channels-last step hands them to oneDNN.
//
// Primitives are built once per shape and kept (oneDNN primitives may be
// executed concurrently from several threads). Scratch space is per calling
// thread. Each call runs on `$COLLAB_ONEDNN_THREADS` OpenMP threads (default
// 1, the calling XLA thread): XLA:CPU runs independent ops (a layer's input
// and weight gradients, the branches of a head tree) on its own threads at
// the same time, and a 2-thread OpenMP team beside XLA's busy threads was
// slower on 2 cores (experiments/README.md, "Benchmark").
//
// Built by `make onednn` (collab_jax/models/onednn_conv.py loads it); works
// with oneDNN 2.x (Debian 12's libdnnl-dev 2.6) and 3.x.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// The geometry of one convolution (NHWC x HWIO -> NHWC).
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow;
  int64_t sh, sw, pt, pb, pl, pr;

  std::string Key(const char* kind) const {
    std::ostringstream s;
    s << kind;
    for (int64_t v : {n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr})
      s << ',' << v;
    return s.str();
  }
  memory::desc Src(tag t = tag::nhwc) const {
    return memory::desc({n, c, h, w}, dt::f32, t);
  }
  memory::desc Dst(tag t = tag::nhwc) const {
    return memory::desc({n, o, oh, ow}, dt::f32, t);
  }
  memory::desc Weights(tag t) const {
    return memory::desc({o, c, kh, kw}, dt::f32, t);
  }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadL() const { return {pt, pl}; }
  memory::dims PadR() const { return {pb, pr}; }
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
#if DNNL_VERSION_MAJOR >= 3
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, g.Src(), g.Weights(tag::any),
      g.Dst(), g.Strides(), g.PadL(), g.PadR(), UserScratchpad());
#else
  dnnl::convolution_forward::desc d(
      dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      g.Src(), g.Weights(tag::any), g.Dst(), g.Strides(), g.PadL(), g.PadR());
  return dnnl::convolution_forward::primitive_desc(d, UserScratchpad(),
                                                   Engine());
#endif
}

// One piece (forward, backward data or backward weights) of one geometry:
// the primitive, and the reorder between the user's HWIO weights and the
// primitive's weights layout (absent when they are the same).
struct Entry {
  dnnl::primitive prim;
  memory::desc weights;       // the primitive's weights (or diff weights)
  memory::desc user_weights;  // HWIO
  bool reorder = false;
  dnnl::reorder weights_reorder;
  size_t scratchpad_bytes = 0;
  std::string impl;
};

void SetWeights(Entry& e, const memory::desc& prim_weights, bool to_user) {
  e.weights = prim_weights;
  e.reorder = !(prim_weights == e.user_weights);
  if (e.reorder) {
    const memory::desc& from = to_user ? prim_weights : e.user_weights;
    const memory::desc& to = to_user ? e.user_weights : prim_weights;
    e.weights_reorder =
        dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(),
                                                    to));
  }
}

std::shared_ptr<Entry> Build(const char* kind, const Geometry& g) {
  auto e = std::make_shared<Entry>();
  e->user_weights = g.Weights(tag::hwio);
  auto fwd = ForwardPd(g);
  if (!std::strcmp(kind, "fwd")) {
    SetWeights(*e, fwd.weights_desc(), /*to_user=*/false);
    e->prim = dnnl::convolution_forward(fwd);
    e->scratchpad_bytes = fwd.scratchpad_desc().get_size();
    e->impl = fwd.impl_info_str();
  } else if (!std::strcmp(kind, "bwd_data")) {
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(),
        g.Weights(tag::any), g.Dst(), g.Strides(), g.PadL(), g.PadR(), fwd,
        UserScratchpad());
#else
    dnnl::convolution_backward_data::desc d(
        dnnl::algorithm::convolution_direct, g.Src(), g.Weights(tag::any),
        g.Dst(), g.Strides(), g.PadL(), g.PadR());
    dnnl::convolution_backward_data::primitive_desc pd(d, UserScratchpad(),
                                                       Engine(), fwd);
#endif
    SetWeights(*e, pd.weights_desc(), /*to_user=*/false);
    e->prim = dnnl::convolution_backward_data(pd);
    e->scratchpad_bytes = pd.scratchpad_desc().get_size();
    e->impl = pd.impl_info_str();
  } else {
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.Src(),
        g.Weights(tag::any), g.Dst(), g.Strides(), g.PadL(), g.PadR(), fwd,
        UserScratchpad());
#else
    dnnl::convolution_backward_weights::desc d(
        dnnl::algorithm::convolution_direct, g.Src(), g.Weights(tag::any),
        g.Dst(), g.Strides(), g.PadL(), g.PadR());
    dnnl::convolution_backward_weights::primitive_desc pd(d, UserScratchpad(),
                                                          Engine(), fwd);
#endif
    SetWeights(*e, pd.diff_weights_desc(), /*to_user=*/true);
    e->prim = dnnl::convolution_backward_weights(pd);
    e->scratchpad_bytes = pd.scratchpad_desc().get_size();
    e->impl = pd.impl_info_str();
  }
  return e;
}

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<Entry>>& Cache() {
  static auto* cache =
      new std::unordered_map<std::string, std::shared_ptr<Entry>>();
  return *cache;
}

std::shared_ptr<Entry> Get(const char* kind, const Geometry& g) {
  std::string key = g.Key(kind);
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = Cache().find(key);
    if (it != Cache().end()) return it->second;
  }
  auto e = Build(kind, g);  // outside the lock: building may take a while
  std::lock_guard<std::mutex> lock(cache_mutex);
  return Cache().emplace(key, e).first->second;
}

// Grow-only scratch buffers of the calling thread, 64-byte aligned.
struct Scratch {
  std::vector<char> bytes;
  void* Get(size_t size) {
    if (bytes.size() < size + 64) bytes.resize(size + 64);
    uintptr_t p = reinterpret_cast<uintptr_t>(bytes.data());
    return reinterpret_cast<void*>((p + 63) & ~uintptr_t{63});
  }
};

thread_local Scratch scratchpad, weights_scratch;

ffi::Error CheckGeometry(const Geometry& g) {
  if (g.oh != (g.h + g.pt + g.pb - g.kh) / g.sh + 1 ||
      g.ow != (g.w + g.pl + g.pr - g.kw) / g.sw + 1 || g.sh < 1 || g.sw < 1)
    return ffi::Error::InvalidArgument(
        "onednn_conv: output shape does not match input, strides, padding");
  return ffi::Error::Success();
}

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                      ffi::Span<const int64_t> y, int64_t sh, int64_t sw,
                      int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Geometry{x[0], x[1], x[2], x[3], w[0], w[1], w[3],
                  y[1], y[2], sh,   sw,   pt,   pb,   pl,  pr};
}

// Sets the OpenMP threads of the calling thread for oneDNN (once per thread).
void SetThreads() {
  static const int threads = [] {
    const char* env = std::getenv("COLLAB_ONEDNN_THREADS");
    int n = env ? std::atoi(env) : 1;
    return n > 0 ? n : 1;
  }();
  thread_local bool done = false;
  if (!done) {
    omp_set_num_threads(threads);
    done = true;
  }
}

// Runs `e` with `args`, plus the weights (reordered on the way in or out)
// and a scratchpad.
void Run(Entry& e, std::unordered_map<int, memory> args, int weights_arg,
         void* user_weights, bool weights_out) {
  dnnl::stream stream(Engine());
  memory user(e.user_weights, Engine(), user_weights);
  memory prim_weights = user;
  if (e.reorder) {
    prim_weights = memory(e.weights, Engine(),
                          weights_scratch.Get(e.weights.get_size()));
    if (!weights_out) {
      e.weights_reorder.execute(stream, user, prim_weights);
    }
  }
  args[weights_arg] = prim_weights;
  if (e.scratchpad_bytes) {
    memory::desc sd({static_cast<int64_t>(e.scratchpad_bytes)}, dt::u8,
                    tag::a);
    args[DNNL_ARG_SCRATCHPAD] =
        memory(sd, Engine(), scratchpad.Get(e.scratchpad_bytes));
  }
  e.prim.execute(stream, args);
  if (e.reorder && weights_out) {
    e.weights_reorder.execute(stream, prim_weights, user);
  }
  stream.wait();
}

// How many chunks of the batch a call runs as: `$COLLAB_ONEDNN_PARTS`, or by
// default one per thread of XLA's intra-op pool.
int Parts(ffi::ThreadPool& pool, int64_t n) {
  static const int parts = [] {
    const char* env = std::getenv("COLLAB_ONEDNN_PARTS");
    return env ? std::atoi(env) : 0;
  }();
  int64_t p = parts > 0 ? parts : pool.num_threads();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(p, n)));
}

// Runs fn(part, begin, count) over `parts` chunks of a batch of `n`: chunk 0
// on the calling thread, the others as tasks of XLA's intra-op pool. A chunk
// that no pool thread has started by the time the caller is done with its
// own is run by the caller, so a busy pool (another op, another process on
// the core) costs no waiting. Returns oneDNN's first error message, if any.
template <typename F>
std::string ParallelOverBatch(ffi::ThreadPool& pool, int64_t n, int parts,
                              F fn) {
  struct State {
    explicit State(int parts) : claimed(parts), remaining(parts) {
      for (auto& c : claimed) c = false;
    }
    std::vector<std::atomic<bool>> claimed;
    std::atomic<int> remaining;
    std::mutex mu;
    std::condition_variable done;
    std::string error;
  };
  auto state = std::make_shared<State>(parts);
  auto run = [state, fn, n, parts](int p) {
    if (state->claimed[p].exchange(true)) return;
    int64_t begin = n * p / parts, end = n * (p + 1) / parts;
    try {
      SetThreads();
      fn(p, begin, end - begin);
    } catch (const dnnl::error& err) {
      std::lock_guard<std::mutex> lock(state->mu);
      if (state->error.empty()) state->error = err.what();
    }
    if (--state->remaining == 0) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->done.notify_all();
    }
  };
  for (int p = 1; p < parts; ++p) pool.Schedule([run, p] { run(p); });
  for (int p = 0; p < parts; ++p) run(p);
  std::unique_lock<std::mutex> lock(state->mu);
  state->done.wait(lock, [&] { return state->remaining == 0; });
  return state->error;
}

Geometry WithBatch(Geometry g, int64_t n) {
  g.n = n;
  return g;
}

ffi::Error Result(const std::string& error) {
  if (error.empty()) return ffi::Error::Success();
  return ffi::Error::Internal("oneDNN: " + error);
}

ffi::Error ConvFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                       int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                       int64_t pl, int64_t pr) {
  Geometry g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(),
                            sh, sw, pt, pb, pl, pr);
  if (auto err = CheckGeometry(g); !err.success()) return err;
  float* xs = x.typed_data();
  float* ys = y->typed_data();
  float* ws = w.typed_data();
  return Result(ParallelOverBatch(
      pool, g.n, Parts(pool, g.n), [&](int, int64_t begin, int64_t count) {
        Geometry part = WithBatch(g, count);
        Run(*Get("fwd", part),
            {{DNNL_ARG_SRC, memory(part.Src(), Engine(),
                                   xs + begin * g.h * g.w * g.c)},
             {DNNL_ARG_DST, memory(part.Dst(), Engine(),
                                   ys + begin * g.oh * g.ow * g.o)}},
            DNNL_ARG_WEIGHTS, ws, /*weights_out=*/false);
      }));
}

ffi::Error ConvBwdDataImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                           ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> dx, int64_t sh,
                           int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                           int64_t pr) {
  Geometry g = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(),
                            sh, sw, pt, pb, pl, pr);
  if (auto err = CheckGeometry(g); !err.success()) return err;
  float* dys = dy.typed_data();
  float* dxs = dx->typed_data();
  float* ws = w.typed_data();
  return Result(ParallelOverBatch(
      pool, g.n, Parts(pool, g.n), [&](int, int64_t begin, int64_t count) {
        Geometry part = WithBatch(g, count);
        Run(*Get("bwd_data", part),
            {{DNNL_ARG_DIFF_DST, memory(part.Dst(), Engine(),
                                        dys + begin * g.oh * g.ow * g.o)},
             {DNNL_ARG_DIFF_SRC, memory(part.Src(), Engine(),
                                        dxs + begin * g.h * g.w * g.c)}},
            DNNL_ARG_WEIGHTS, ws, /*weights_out=*/false);
      }));
}

// Each chunk of the batch gives its own weight gradient; chunk 0 writes the
// result, the others partial sums that are added to it.
ffi::Error ConvBwdWeightsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> dy,
                              ffi::ResultBuffer<ffi::F32> dw, int64_t sh,
                              int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                              int64_t pr) {
  Geometry g = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(),
                            sh, sw, pt, pb, pl, pr);
  if (auto err = CheckGeometry(g); !err.success()) return err;
  float* xs = x.typed_data();
  float* dys = dy.typed_data();
  float* dws = dw->typed_data();
  const int64_t size = g.kh * g.kw * g.c * g.o;
  const int parts = Parts(pool, g.n);
  std::vector<std::vector<float>> partial(parts - 1, std::vector<float>(size));
  std::string error = ParallelOverBatch(
      pool, g.n, parts, [&](int p, int64_t begin, int64_t count) {
        Geometry part = WithBatch(g, count);
        Run(*Get("bwd_w", part),
            {{DNNL_ARG_SRC, memory(part.Src(), Engine(),
                                   xs + begin * g.h * g.w * g.c)},
             {DNNL_ARG_DIFF_DST, memory(part.Dst(), Engine(),
                                        dys + begin * g.oh * g.ow * g.o)}},
            DNNL_ARG_DIFF_WEIGHTS, p ? partial[p - 1].data() : dws,
            /*weights_out=*/true);
      });
  for (const auto& sum : partial) {
    for (int64_t i = 0; i < size; ++i) dws[i] += sum[i];
  }
  return Result(error);
}

}  // namespace

#define CONV_BINDING                             \
  ffi::Ffi::Bind()                               \
      .Ctx<ffi::ThreadPool>()                    \
      .Arg<ffi::Buffer<ffi::F32>>()              \
      .Arg<ffi::Buffer<ffi::F32>>()              \
      .Ret<ffi::Buffer<ffi::F32>>()              \
      .Attr<int64_t>("stride_h")                 \
      .Attr<int64_t>("stride_w")                 \
      .Attr<int64_t>("pad_top")                  \
      .Attr<int64_t>("pad_bottom")               \
      .Attr<int64_t>("pad_left")                 \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CollabOnednnConvFwd, ConvFwdImpl,
                              CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CollabOnednnConvBwdData, ConvBwdDataImpl,
                              CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CollabOnednnConvBwdWeights, ConvBwdWeightsImpl,
                              CONV_BINDING);

// The implementation oneDNN chose for `kind` ("fwd", "bwd_data", "bwd_w") of
// a geometry, e.g. "brg_conv_fwd:avx512_core" (for tests and the benchmark).
extern "C" const char* collab_onednn_impl(const char* kind, const int64_t* v) {
  thread_local std::string out;
  Geometry g{v[0], v[1], v[2],  v[3],  v[4],  v[5],  v[6], v[7],
             v[8], v[9], v[10], v[11], v[12], v[13], v[14]};
  try {
    SetThreads();
    out = Get(kind, g)->impl;
  } catch (const dnnl::error& err) {
    out = std::string("error: ") + err.what();
  }
  return out.c_str();
}

extern "C" int collab_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
