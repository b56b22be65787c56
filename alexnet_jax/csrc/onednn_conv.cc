// oneDNN's convolutions as XLA FFI handlers for XLA:CPU (alexnet_jax/onednn.py builds and loads
// this file): float32, NHWC activations and HWIO kernels (the model's layouts), one stride and one
// padding for both spatial axes, the right/bottom padding implied by the output's size (as
// lax.conv_general_dilated drops the rows a stride does not reach). XLA:CPU runs its own
// convolutions on Eigen, 1.2-1.5x slower than these on AVX-512 (README, "Performance").
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Geometry of one convolution: x (n, h, w, c), kernel (kh, kw, c, o), y (n, oh, ow, o).
// bf16: the operands (x, the kernel, the output's gradient) are bfloat16 and every result float32:
// what a bfloat16 matrix unit computes, on oneDNN's AVX512-BF16 or AMX kernels.
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, stride, pad;
  bool bf16;
  auto Key() const { return std::make_tuple(n, h, w, c, kh, kw, o, oh, ow, stride, pad, bf16); }
  dt In() const { return bf16 ? dt::bf16 : dt::f32; }
  memory::dims Src() const { return {n, c, h, w}; }
  memory::dims Wei() const { return {o, c, kh, kw}; }
  memory::dims Dst() const { return {n, o, oh, ow}; }
  memory::dims Strides() const { return {stride, stride}; }
  memory::dims PadL() const { return {pad, pad}; }
  memory::dims PadR() const {
    return {(oh - 1) * stride + kh - h - pad, (ow - 1) * stride + kw - w - pad};
  }
};

struct Plan {
  dnnl::convolution_forward::primitive_desc fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights;
  dnnl::convolution_forward fwd_prim;
  dnnl::convolution_backward_data bwd_data_prim;
  dnnl::convolution_backward_weights bwd_weights_prim;
};

// Only called under Run's lock.
Plan& GetPlan(const Geometry& g) {
  static std::map<decltype(g.Key()), std::unique_ptr<Plan>> plans;
  auto& slot = plans[g.Key()];
  if (!slot) {
    auto& eng = Engine();
    auto conv_algo = dnnl::algorithm::convolution_direct;
    memory::desc src(g.Src(), g.In(), tag::nhwc), dst_in(g.Dst(), g.In(), tag::nhwc);
    memory::desc wei(g.Wei(), g.In(), tag::any);
    memory::desc dst(g.Dst(), dt::f32, tag::nhwc), diff_src(g.Src(), dt::f32, tag::nhwc);
    memory::desc diff_wei(g.Wei(), dt::f32, tag::any);
    auto fwd = dnnl::convolution_forward::primitive_desc(
        eng, dnnl::prop_kind::forward_training, conv_algo, src, wei, dst, g.Strides(), g.PadL(),
        g.PadR());
    // The backward passes' hint: a forward whose output has the operands' type, as in training.
    auto hint = g.bf16 ? dnnl::convolution_forward::primitive_desc(
                             eng, dnnl::prop_kind::forward_training, conv_algo, src, wei, dst_in,
                             g.Strides(), g.PadL(), g.PadR())
                       : fwd;
    auto bd = dnnl::convolution_backward_data::primitive_desc(
        eng, conv_algo, diff_src, wei, dst_in, g.Strides(), g.PadL(), g.PadR(), hint);
    auto bw = dnnl::convolution_backward_weights::primitive_desc(
        eng, conv_algo, src, diff_wei, dst_in, g.Strides(), g.PadL(), g.PadR(), hint);
    slot.reset(new Plan{fwd, bd, bw, dnnl::convolution_forward(fwd),
                        dnnl::convolution_backward_data(bd),
                        dnnl::convolution_backward_weights(bw)});
  }
  return *slot;
}

template <ffi::DataType T>
Geometry Geom(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, ffi::Span<const int64_t> y,
              int64_t stride, int64_t pad) {
  return Geometry{x[0], x[1], x[2], x[3], k[0], k[1], k[3], y[1], y[2], stride, pad,
                  T == ffi::DataType::BF16};
}

// The kernel in HWIO (o, i, h, w logical) and, if the primitive wants another layout, a copy.
memory UserKernel(const Geometry& g, dt type, void* data) {
  return memory({g.Wei(), type, tag::hwio}, Engine(), data);
}

memory AsWanted(const memory& user, const memory::desc& wanted, dnnl::stream& s) {
  if (user.get_desc() == wanted) return user;
  memory m(wanted, Engine());
  dnnl::reorder(user, m).execute(s, const_cast<memory&>(user), m);
  return m;
}

// One primitive call with g's plan: one call at a time (each runs its own OpenMP team over all
// cores, and XLA:CPU may call two at once from its thread pool), and oneDNN's errors, C++
// exceptions, returned as FFI errors instead of crossing into XLA.
template <typename Body>
ffi::Error Run(const Geometry& g, Body body) {
  static std::mutex mu;
  try {
    std::lock_guard<std::mutex> lock(mu);
    Plan& p = GetPlan(g);
    dnnl::stream s(Engine());
    body(p, s);
    s.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error Forward(ffi::Buffer<T> x, ffi::Buffer<T> k, ffi::ResultBuffer<ffi::F32> y,
                   int64_t stride, int64_t pad) {
  Geometry g = Geom<T>(x.dimensions(), k.dimensions(), y->dimensions(), stride, pad);
  return Run(g, [&](Plan& p, dnnl::stream& s) {
    memory src(p.fwd.src_desc(), Engine(), x.untyped_data());
    memory dst(p.fwd.dst_desc(), Engine(), y->untyped_data());
    memory wei = AsWanted(UserKernel(g, g.In(), k.untyped_data()), p.fwd.weights_desc(), s);
    p.fwd_prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
  });
}

template <ffi::DataType T>
ffi::Error BackwardData(ffi::Buffer<T> dy, ffi::Buffer<T> k, ffi::ResultBuffer<ffi::F32> dx,
                        int64_t stride, int64_t pad) {
  Geometry g = Geom<T>(dx->dimensions(), k.dimensions(), dy.dimensions(), stride, pad);
  return Run(g, [&](Plan& p, dnnl::stream& s) {
    memory diff_dst(p.bwd_data.diff_dst_desc(), Engine(), dy.untyped_data());
    memory diff_src(p.bwd_data.diff_src_desc(), Engine(), dx->untyped_data());
    memory wei = AsWanted(UserKernel(g, g.In(), k.untyped_data()), p.bwd_data.weights_desc(), s);
    p.bwd_data_prim.execute(
        s, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DIFF_SRC, diff_src}});
  });
}

template <ffi::DataType T>
ffi::Error BackwardWeights(ffi::Buffer<T> x, ffi::Buffer<T> dy, ffi::ResultBuffer<ffi::F32> dk,
                           int64_t stride, int64_t pad) {
  Geometry g = Geom<T>(x.dimensions(), dk->dimensions(), dy.dimensions(), stride, pad);
  return Run(g, [&](Plan& p, dnnl::stream& s) {
    memory src(p.bwd_weights.src_desc(), Engine(), x.untyped_data());
    memory diff_dst(p.bwd_weights.diff_dst_desc(), Engine(), dy.untyped_data());
    memory user = UserKernel(g, dt::f32, dk->untyped_data());
    bool direct = user.get_desc() == p.bwd_weights.diff_weights_desc();
    memory diff_wei = direct ? user : memory(p.bwd_weights.diff_weights_desc(), Engine());
    p.bwd_weights_prim.execute(
        s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, diff_wei}});
    if (!direct) dnnl::reorder(diff_wei, user).execute(s, diff_wei, user);
  });
}

}  // namespace

#define ONEDNN_CONV_HANDLER(name, impl, type)             \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl<type>,          \
                                ffi::Ffi::Bind()           \
                                    .Arg<ffi::Buffer<type>>() \
                                    .Arg<ffi::Buffer<type>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>() \
                                    .Attr<int64_t>("stride") \
                                    .Attr<int64_t>("pad"));

ONEDNN_CONV_HANDLER(OnednnConvForward, Forward, ffi::F32)
ONEDNN_CONV_HANDLER(OnednnConvBackwardData, BackwardData, ffi::F32)
ONEDNN_CONV_HANDLER(OnednnConvBackwardWeights, BackwardWeights, ffi::F32)
ONEDNN_CONV_HANDLER(OnednnConvForwardBf16, Forward, ffi::BF16)
ONEDNN_CONV_HANDLER(OnednnConvBackwardDataBf16, BackwardData, ffi::BF16)
ONEDNN_CONV_HANDLER(OnednnConvBackwardWeightsBf16, BackwardWeights, ffi::BF16)
