// A quantized layer as one autograd node (layers._QuantizedOp in C++), with the stragglers' weight gradient.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/custom_function.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "constants.h"
#include "lsq.h"

namespace {

// ---- A quantized layer as one autograd node ---------------------------------------------------------------
//
// What layers._QuantizedOp does (the same kernels and ATen calls in the same order, so the same bits), as
// a C++ autograd function: on a small model the Python autograd function's own work (argument handling,
// context, the Python backward) cost more than its kernels. See layers.py for the backward's shortcuts.

// A convolution ``{stride, stride, padding, padding, dilation, dilation, groups}`` or, empty, a linear layer.
struct Op {
  std::vector<int64_t> conv;
  bool linear() const { return conv.empty(); }
  at::IntArrayRef stride() const { return at::IntArrayRef(conv).slice(0, 2); }
  at::IntArrayRef padding() const { return at::IntArrayRef(conv).slice(2, 2); }
  at::IntArrayRef dilation() const { return at::IntArrayRef(conv).slice(4, 2); }
  int64_t groups() const { return conv[6]; }

  at::Tensor operator()(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) const {
    return linear() ? at::linear(x, w, b) : at::conv2d(x, w, b, stride(), padding(), dilation(), groups());
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward(const at::Tensor& g, const at::Tensor& x,
                                                               const at::Tensor& w, int64_t groups,
                                                               std::array<bool, 3> mask) const {
    const std::vector<int64_t> bias_sizes{g.size(1)};
    return at::convolution_backward(g, x, w, mask[2] ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt,
                                    stride(), padding(), dilation(), false, {0, 0}, groups, mask);
  }

  at::Tensor grad_input(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w) const {
    return linear() ? g.matmul(w) : std::get<0>(conv_backward(g, x, w, groups(), {true, false, false}));
  }

  // The weight gradient of the output channels ``active`` (all where undefined).
  at::Tensor grad_weight(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                         const at::Tensor& active) const {
    if (linear()) {
      const at::Tensor g2 = g.reshape({-1, g.size(-1)}), x2 = x.reshape({-1, x.size(-1)});
      return (active.defined() ? g2.index_select(1, active) : g2).t().mm(x2);
    }
    if (!active.defined()) return std::get<1>(conv_backward(g, x, w, groups(), {false, true, false}));
    const bool depthwise = groups() == x.size(1) && groups() == w.size(0);
    return std::get<1>(conv_backward(g.index_select(1, active), depthwise ? x.index_select(1, active) : x,
                                     w.index_select(0, active), depthwise ? active.numel() : 1,
                                     {false, true, false}));
  }

  at::Tensor grad_bias(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w) const {
    return linear() ? g.reshape({-1, g.size(-1)}).sum(0)
                    : std::get<2>(conv_backward(g, x, w, groups(), {false, false, true}));
  }
};

// ---- The stragglers' weight gradient ---------------------------------------------------------------------
//
// A layer of which only a few weights still train (the paper's stragglers: after the burst in which most
// of a layer freezes, a few weights per channel keep it from completing) needs the weight gradient of those
// few only. The dense weight-gradient convolution / GEMM computes every weight's; here each trainable
// weight's gradient is one dot product of its output channel's gradient with the input it multiplies, so
// the work is proportional to the weights that train.

constexpr int64_t kDotLanes = 8;

// ``acc + Σ a[k] · b[k]`` over ``count`` terms, in a fixed order: eight float lanes, the rest in ``tail``.
inline void dot_into(float* __restrict acc, double& tail, const float* __restrict a, const float* __restrict b,
                     int64_t count) {
  int64_t k = 0;
  for (; k + kDotLanes <= count; k += kDotLanes) {
    for (int64_t l = 0; l < kDotLanes; ++l) acc[l] += a[k + l] * b[k + l];
  }
  for (; k < count; ++k) tail += a[k] * b[k];
}

inline float lanes_sum(const float* acc, double tail) {
  for (int64_t l = 0; l < kDotLanes; ++l) tail += acc[l];
  return static_cast<float>(tail);
}

// ``∂L/∂ŵ`` of the weights at ``index`` (flat indices into the weight) of a convolution (groups 1 or
// depthwise) or a linear layer, from its quantized input ``x_hat`` and output gradient ``grad_out``. Both
// are first laid out with the batch (the examples) innermost, so that every weight's sum is a series of
// contiguous dot products.
std::vector<float> trainable_weight_grads(const Op& op, const at::Tensor& x_hat, const at::Tensor& grad_out,
                                          at::IntArrayRef w_shape, const std::vector<int64_t>& index) {
  std::vector<float> out(index.size());
  const int64_t n_index = static_cast<int64_t>(index.size());
  if (op.linear()) {  // ∂L/∂W[o, k] = Σ_m g[m, o] x[m, k]
    const int64_t features = w_shape[1], outputs = w_shape[0];
    const at::Tensor xt = x_hat.reshape({-1, features}).t().contiguous();
    const at::Tensor gt = grad_out.reshape({-1, outputs}).t().contiguous();
    const int64_t rows = xt.size(1);
    const float* xp = xt.data_ptr<float>();
    const float* gp = gt.data_ptr<float>();
    at::parallel_for(0, n_index, 16, [&](int64_t first, int64_t last) {
      for (int64_t e = first; e < last; ++e) {
        const int64_t o = index[e] / features, k = index[e] % features;
        float acc[kDotLanes] = {};
        double tail = 0;
        dot_into(acc, tail, gp + o * rows, xp + k * rows, rows);
        out[e] = lanes_sum(acc, tail);
      }
    });
    return out;
  }
  // ∂L/∂W[o, c, i, j] = Σ_{oh, ow} Σ_n g[n, o, oh, ow] x[n, c, oh·sh - ph + i·dh, ow·sw - pw + j·dw]
  const at::Tensor x = x_hat.permute({1, 2, 3, 0}).contiguous();  // [C, H, W, N]
  const at::Tensor g = grad_out.permute({1, 2, 3, 0}).contiguous();  // [O, Ho, Wo, N]
  const int64_t height = x.size(1), width = x.size(2), batch = x.size(3);
  const int64_t out_h = g.size(1), out_w = g.size(2);
  const int64_t in_per_group = w_shape[1], kh = w_shape[2], kw = w_shape[3];
  const bool depthwise = op.groups() > 1;
  TORCH_CHECK(!depthwise || (in_per_group == 1 && op.groups() == w_shape[0]),
              "hf_lts: the stragglers' weight gradient takes convolutions with groups 1 or depthwise ones");
  const int64_t sh = op.stride()[0], sw = op.stride()[1], ph = op.padding()[0], pw = op.padding()[1];
  const int64_t dh = op.dilation()[0], dw = op.dilation()[1];
  const float* xp = x.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  at::parallel_for(0, n_index, 4, [&](int64_t first, int64_t last) {
    for (int64_t e = first; e < last; ++e) {
      int64_t rest = index[e];
      const int64_t j = rest % kw;
      rest /= kw;
      const int64_t i = rest % kh;
      rest /= kh;
      const int64_t c_in = rest % in_per_group, o = rest / in_per_group;
      const int64_t c = depthwise ? o : c_in;
      float acc[kDotLanes] = {};
      double tail = 0;
      for (int64_t oh = 0; oh < out_h; ++oh) {
        const int64_t ih = oh * sh - ph + i * dh;
        if (ih < 0 || ih >= height) continue;
        for (int64_t ow = 0; ow < out_w; ++ow) {
          const int64_t iw = ow * sw - pw + j * dw;
          if (iw < 0 || iw >= width) continue;
          dot_into(acc, tail, gp + ((o * out_h + oh) * out_w + ow) * batch,
                   xp + ((c * height + ih) * width + iw) * batch, batch);
        }
      }
      out[e] = lanes_sum(acc, tail);
    }
  });
  return out;
}

// `weight_grad` of a layer whose trainable weights (not frozen in ``packed``) are few: their gradients
// come from `trainable_weight_grads`, every frozen weight's is zero.
std::tuple<at::Tensor, at::Tensor> straggler_weight_grad(const Op& op, const at::Tensor& x_hat,
                                                         const at::Tensor& grad_out, const at::Tensor& w,
                                                         const at::Tensor& scale, double qmin_d, double qmax_d,
                                                         const at::Tensor& packed) {
  const Layout l = layout(w, scale);
  const int32_t* p = packed_ptr(packed, w);
  std::vector<int64_t> index;
  for (int64_t k = 0; k < w.numel(); ++k) {
    if (!is_frozen(p[k])) index.push_back(k);
  }
  const std::vector<float> grads = trainable_weight_grads(op, x_hat, grad_out, w.sizes(), index);
  const std::vector<float> s = steps(scale);
  const float qmin = static_cast<float>(qmin_d), qmax = static_cast<float>(qmax_d);
  const float* wp = w.data_ptr<float>();
  at::Tensor grad_w = at::zeros_like(w);
  float* gw = grad_w.data_ptr<float>();
  std::vector<double> sums(l.channels, 0.0);
  const int64_t per_channel = w.numel() / l.channels;
  for (size_t e = 0; e < index.size(); ++e) {
    const int64_t k = index[e], c = k / per_channel;
    float q, inside, dq;
    step_terms<false>(wp[k], 1.0f / s[c], qmin, qmax, 0, q, inside, dq);
    gw[k] = grads[e] * inside;
    sums[c] += grads[e] * dq;
  }
  at::Tensor grad_scale = at::empty({l.channels}, w.options());
  float* gs = grad_scale.data_ptr<float>();
  for (int64_t c = 0; c < l.channels; ++c) gs[c] = static_cast<float>(sums[c]);
  return {grad_w, grad_scale};
}

std::optional<at::Tensor> given(const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; }

struct QuantLayer : public torch::autograd::Function<QuantLayer> {
  // bounds: (input Qn, Qp, weight Qn, Qp); factors: LSQ's gradient factors of the input and weight steps;
  // stragglers: compute the weight gradient of the trainable weights only (straggler_weight_grad).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& input_scale, const at::Tensor& weight_scale,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& packed,
                            const std::optional<at::Tensor>& held, const std::optional<at::Tensor>& active,
                            std::vector<double> bounds, std::vector<double> factors, std::vector<int64_t> conv,
                            bool zero_skipped, bool stragglers) {
    const Op op{conv};
    const at::Tensor xc = x.contiguous();
    at::Tensor w_hat;
    at::Tensor x_hat;
    if (held.has_value()) {
      x_hat = fake_quant(xc, input_scale, bounds[0], bounds[1], std::nullopt);
      w_hat = *held;
    } else {
      std::tie(x_hat, w_hat) = layer_forward(xc, input_scale, bounds[0], bounds[1], weight.contiguous(),
                                             weight_scale, bounds[2], bounds[3], packed);
    }
    at::Tensor out = op(x_hat, w_hat, bias);
    // ``q·s`` of the weight is recomputed in the backward (one weight-sized pass) rather than kept between the
    // passes: kept, it costs every layer's weight once more in memory. A fully frozen layer's is kept anyway.
    ctx->save_for_backward({x, weight, input_scale, weight_scale, packed.value_or(at::Tensor()),
                            held.has_value() ? w_hat : at::Tensor()});
    ctx->saved_data["active"] = active.value_or(at::Tensor());
    ctx->saved_data["bounds"] = bounds;
    ctx->saved_data["factors"] = factors;
    ctx->saved_data["conv"] = conv;
    ctx->saved_data["zero_skipped"] = zero_skipped;
    ctx->saved_data["bias"] = bias.has_value();
    ctx->saved_data["stragglers"] = stragglers;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &input_scale = saved[2], &weight_scale = saved[3];
    const at::Tensor& packed = saved[4];
    const std::vector<double> bounds = ctx->saved_data["bounds"].toDoubleVector();
    const at::Tensor w_hat = saved[5].defined() ? saved[5]
                                                : fake_quant(weight.contiguous(), weight_scale, bounds[2],
                                                             bounds[3], given(packed));
    const at::Tensor active = ctx->saved_data["active"].toTensor();
    const std::vector<double> factors = ctx->saved_data["factors"].toDoubleVector();
    const Op op{ctx->saved_data["conv"].toIntVector()};
    const bool has_bias = ctx->saved_data["bias"].toBool();
    const at::Tensor& grad_out = grads[0];
    // Gradient slots are numbered over the tensor arguments given: x, weight, the two steps, the bias.
    const bool need_x = ctx->needs_input_grad(0), need_input_scale = ctx->needs_input_grad(2);
    const bool need_weight = (ctx->needs_input_grad(1) || ctx->needs_input_grad(3)) &&
                             (!active.defined() || active.numel() > 0);
    const bool need_bias = has_bias && ctx->needs_input_grad(4);
    const bool need_x_hat = need_weight || need_bias;  // the quantized input: read by those gradients only
    const at::Tensor xc = x.contiguous();
    at::Tensor grad_x, grad_input_scale, grad_weight, grad_weight_scale, grad_bias, x_hat;
    if (need_x) {  // the input gradient takes the place of ∂L/∂x̂
      at::Tensor grad_flat = op.grad_input(grad_out, x, w_hat).reshape({-1});
      at::Tensor step_sum;
      std::tie(step_sum, x_hat) =
          input_grad_into(xc, input_scale, bounds[0], bounds[1], grad_flat, need_x_hat);
      grad_x = grad_flat.view(x.sizes());
      if (need_input_scale) grad_input_scale = step_sum.mul(factors[0]);
    } else if (need_input_scale) {  // Σ ∂L/∂x̂ ⊙ dq = Σ ∂L/∂y ⊙ op(dq, ŵ)
      at::Tensor dq;
      std::tie(dq, x_hat) = input_step_terms(xc, input_scale, bounds[0], bounds[1]);
      const at::Tensor y = op(dq, w_hat, std::nullopt);
      grad_input_scale = at::dot(grad_out.reshape({-1}), y.reshape({-1})).reshape({1}).mul(factors[0]);
    } else if (need_x_hat) {
      x_hat = fake_quant(xc, input_scale, bounds[0], bounds[1], std::nullopt);
    }
    if (need_weight) {
      const at::Tensor wc = weight.contiguous();
      if (ctx->saved_data["stragglers"].toBool()) {
        std::tie(grad_weight, grad_weight_scale) =
            straggler_weight_grad(op, x_hat, grad_out, wc, weight_scale, bounds[2], bounds[3], packed);
      } else {  // the dense weight gradient of the channels ``active`` (all where undefined)
        const at::Tensor grad_w_hat = op.grad_weight(grad_out, x_hat, w_hat, active).contiguous();
        std::tie(grad_weight, grad_weight_scale) =
            active.defined() ? weight_grad_rows(wc.view({wc.size(0), -1}), weight_scale, bounds[2], bounds[3],
                                                grad_w_hat, packed, active)
                             : weight_grad(wc, weight_scale, bounds[2], bounds[3], grad_w_hat, given(packed));
      }
      grad_weight = grad_weight.view(weight.sizes());
      grad_weight_scale = grad_weight_scale.mul(factors[1]);
    } else if (ctx->saved_data["zero_skipped"].toBool()) {  // DDP wants a gradient for every parameter
      grad_weight = at::zeros_like(weight);
      grad_weight_scale = at::zeros_like(weight_scale);
    }
    if (need_bias) grad_bias = op.grad_bias(grad_out, x_hat, w_hat);
    torch::autograd::variable_list grads_in(13);  // one per forward argument, the tensors first
    grads_in[0] = grad_x, grads_in[1] = grad_weight, grads_in[2] = grad_input_scale;
    grads_in[3] = grad_weight_scale, grads_in[4] = grad_bias;
    return grads_in;
  }
};

at::Tensor quant_layer(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& input_scale,
                       const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& packed, const std::optional<at::Tensor>& held,
                       const std::optional<at::Tensor>& active, at::ArrayRef<double> bounds,
                       at::ArrayRef<double> factors, at::IntArrayRef conv, bool zero_skipped, bool stragglers) {
  TORCH_CHECK(bounds.size() == 4 && factors.size() == 2 && (conv.empty() || conv.size() == 7),
              "hf_lts::quant_layer: bounds has 4 values, factors 2, conv none or 7");
  return QuantLayer::apply(x, weight, input_scale, weight_scale, bias, packed, held, active, bounds.vec(),
                           factors.vec(), conv.vec(), zero_skipped, stragglers);
}

}  // namespace
