// LSQ fake quantization on a CPU: the forward ``q · s`` and the backward (input, weight and step gradients),
// frozen weights held at their level. Chunked, with sums combined in a fixed order.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>
#include "constants.h"

namespace {

// One tensor seen as [rows, per_row] with one step per channel; a channel is ``rows / channels`` rows.
struct Layout {
  int64_t channels, rows, per_row, chunks;  // chunks per row
  int64_t tasks() const { return rows * chunks; }
  int64_t channel(int64_t row) const { return row / (rows / channels); }
};

Layout layout(const at::Tensor& x, const at::Tensor& scale, int64_t rows = 0) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat,
              "hf_lts kernels take float32 tensors, got ", x.scalar_type(), " and ", scale.scalar_type());
  TORCH_CHECK(x.is_contiguous() && scale.is_contiguous(), "hf_lts kernels take contiguous tensors");
  const int64_t channels = scale.numel();
  rows = rows == 0 ? channels : rows;
  TORCH_CHECK(channels > 0 && rows % channels == 0 && x.numel() % rows == 0, "hf_lts: ", x.numel(),
              " values do not split into ", rows, " rows of ", channels, " channels");
  const int64_t per_row = x.numel() / rows;
  return {channels, rows, per_row, std::max<int64_t>(1, (per_row + kChunk - 1) / kChunk)};
}

// The clamped step of every channel: ``clamp(scale, min=SCALE_EPS)``.
std::vector<float> steps(const at::Tensor& scale) {
  const float* s = scale.data_ptr<float>();
  std::vector<float> out(scale.numel());
  for (int64_t c = 0; c < scale.numel(); ++c) out[c] = s[c] < kScaleEps ? kScaleEps : s[c];
  return out;
}

// Runs ``fn(row, begin, end, task)`` over every chunk of every row, in parallel.
template <typename Fn>
void for_each_chunk(const Layout& l, Fn fn) {
  const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, l.per_row));
  at::parallel_for(0, l.tasks(), grain, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t row = task / l.chunks, j = task % l.chunks;
      const int64_t begin = row * l.per_row + j * kChunk;
      const int64_t end = row * l.per_row + std::min(l.per_row, (j + 1) * kChunk);
      fn(row, begin, end, task);
    }
  });
}

// Per-channel sums of the chunks' partial sums, in task order (a channel's rows, each row's chunks).
at::Tensor channel_sums(const Layout& l, const std::vector<double>& partial, const at::Tensor& like) {
  std::vector<double> sums(l.channels, 0.0);
  for (int64_t task = 0; task < l.tasks(); ++task) sums[l.channel(task / l.chunks)] += partial[task];
  at::Tensor out = at::empty({l.channels}, like.options());
  float* o = out.data_ptr<float>();
  for (int64_t c = 0; c < l.channels; ++c) o[c] = static_cast<float>(sums[c]);
  return out;
}

inline float level_of(int32_t packed) { return static_cast<float>(packed >> kLevelShift); }
inline bool is_frozen(int32_t packed) { return (packed & kFrozenBit) != 0; }

// ``round(v)`` and the clamped level ``q`` of ``v = x · (1/s)``.
inline void quantize(float x, float r, float qmin, float qmax, float& v, float& rounded, float& q) {
  v = x * r;
  rounded = std::nearbyint(v);
  q = rounded < qmin ? qmin : rounded;
  q = q > qmax ? qmax : q;
}

// ``q · s`` of ``x`` (frozen values, with ``kFrozen``, at their held level in ``packed``) into ``out``.
template <bool kFrozen>
void fake_quant_into(const at::Tensor& x, const at::Tensor& scale, double qmin_d, double qmax_d,
                     const int32_t* __restrict packed, at::Tensor& out) {
  const Layout l = layout(x, scale);
  const std::vector<float> s = steps(scale);
  const float qmin = static_cast<float>(qmin_d), qmax = static_cast<float>(qmax_d);
  const float* __restrict xp = x.data_ptr<float>();
  float* __restrict op = out.data_ptr<float>();
  for_each_chunk(l, [&](int64_t c, int64_t begin, int64_t end, int64_t) {
    const float sc = s[c], r = 1.0f / sc;
    for (int64_t i = begin; i < end; ++i) {
      float v, rounded, q;
      quantize(xp[i], r, qmin, qmax, v, rounded, q);
      if constexpr (kFrozen) q = is_frozen(packed[i]) ? level_of(packed[i]) : q;
      op[i] = q * sc;
    }
  });
}

const int32_t* packed_ptr(const std::optional<at::Tensor>& packed, const at::Tensor& x) {
  if (!packed.has_value()) return nullptr;
  TORCH_CHECK(packed->scalar_type() == at::kInt && packed->is_contiguous() && packed->numel() == x.numel(),
              "hf_lts: the LTS state must be a contiguous int32 tensor shaped like the weight");
  return packed->data_ptr<int32_t>();
}

at::Tensor fake_quant(const at::Tensor& x, const at::Tensor& scale, double qmin, double qmax,
                      const std::optional<at::Tensor>& packed) {
  at::Tensor out = at::empty_like(x);
  if (packed.has_value()) {
    fake_quant_into<true>(x, scale, qmin, qmax, packed_ptr(packed, x), out);
  } else {
    fake_quant_into<false>(x, scale, qmin, qmax, nullptr, out);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> layer_forward(const at::Tensor& x, const at::Tensor& x_scale, double x_min,
                                                 double x_max, const at::Tensor& w, const at::Tensor& w_scale,
                                                 double w_min, double w_max,
                                                 const std::optional<at::Tensor>& packed) {
  return {fake_quant(x, x_scale, x_min, x_max, std::nullopt), fake_quant(w, w_scale, w_min, w_max, packed)};
}

// ``q``, the straight-through mask ``inside`` (0 or 1) and ``∂(q·s)/∂s`` of one value; with ``kFrozen``,
// a frozen value is at its level with neither gradient.
template <bool kFrozen>
inline void step_terms(float x, float r, float qmin, float qmax, int32_t packed, float& q, float& inside,
                       float& dq) {
  float v, rounded;
  quantize(x, r, qmin, qmax, v, rounded, q);
  const bool in = q == rounded;
  dq = in ? rounded - v : q;
  inside = in ? 1.0f : 0.0f;
  if constexpr (kFrozen) {
    const bool frozen = is_frozen(packed);
    q = frozen ? level_of(packed) : q;
    inside = frozen ? 0.0f : inside;
    dq = frozen ? 0.0f : dq;
  }
}

// The backward of the values ``[begin, end)`` (one step ``sc``): ``grad_at(i, inside)`` writes what it must
// and returns the gradient that multiplies ``∂(q·s)/∂s`` in the step's sum, returned; ``extra(i, q·s)``
// receives the quantized value.
template <bool kFrozen, typename Grad, typename Extra>
inline double backward_chunk(const float* __restrict xp, const int32_t* __restrict packed, int64_t begin,
                             int64_t end, float sc, float qmin, float qmax, Grad grad_at, Extra extra) {
  const float r = 1.0f / sc;
  const auto element = [&](int64_t i) {
    float q, inside, dq;
    step_terms<kFrozen>(xp[i], r, qmin, qmax, kFrozen ? packed[i] : 0, q, inside, dq);
    extra(i, q * sc);
    return grad_at(i, inside) * dq;
  };
  float acc[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += element(i + k);
  }
  double sum = 0;
  for (; i < end; ++i) sum += element(i);
  for (int64_t k = 0; k < kLanes; ++k) sum += acc[k];
  return sum;
}

// The backward of one tensor (see backward_chunk); returns the step's sum per channel.
template <bool kFrozen, typename Grad, typename Extra>
at::Tensor backward_pass(const at::Tensor& x, const at::Tensor& scale, double qmin, double qmax,
                         const int32_t* packed, Grad grad_at, Extra extra) {
  const Layout l = layout(x, scale);
  const std::vector<float> s = steps(scale);
  const float* xp = x.data_ptr<float>();
  std::vector<double> partial(l.tasks());
  for_each_chunk(l, [&](int64_t c, int64_t begin, int64_t end, int64_t task) {
    partial[task] = backward_chunk<kFrozen>(xp, packed, begin, end, s[c], static_cast<float>(qmin),
                                            static_cast<float>(qmax), grad_at, extra);
  });
  return channel_sums(l, partial, x);
}

// ``(∂L/∂x, Σ grad ⊙ ∂(q·s)/∂s per step)`` of a weight from the gradient of its fake-quantized value.
std::tuple<at::Tensor, at::Tensor> weight_grad(const at::Tensor& x, const at::Tensor& scale, double qmin,
                                               double qmax, const at::Tensor& grad,
                                               const std::optional<at::Tensor>& packed) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.numel() == x.numel(),
              "hf_lts: the gradient must be a contiguous float32 tensor shaped like the input");
  at::Tensor grad_x = at::empty_like(x);
  const float* __restrict g = grad.data_ptr<float>();
  float* __restrict gx = grad_x.data_ptr<float>();
  const auto grad_at = [&](int64_t i, float inside) {
    gx[i] = g[i] * inside;
    return g[i];
  };
  const auto nothing = [](int64_t, float) {};
  at::Tensor grad_scale =
      packed.has_value()
          ? backward_pass<true>(x, scale, qmin, qmax, packed_ptr(packed, x), grad_at, nothing)
          : backward_pass<false>(x, scale, qmin, qmax, nullptr, grad_at, nothing);
  return {grad_x, grad_scale};
}

// `weight_grad` of a weight ``[rows, K]`` of which only ``rows_with_grad`` (the output channels with a
// trainable weight) have a gradient, ``grad`` (``[len(rows_with_grad), K]``); every other row is fully
// frozen, so its gradients are zero and it is not read.
std::tuple<at::Tensor, at::Tensor> weight_grad_rows(const at::Tensor& x, const at::Tensor& scale, double qmin,
                                                    double qmax, const at::Tensor& grad, const at::Tensor& packed,
                                                    const at::Tensor& rows_with_grad) {
  TORCH_CHECK(x.dim() == 2, "hf_lts: weight_grad_rows takes the weight as [rows, K]");
  const Layout l = layout(x, scale, x.size(0));
  TORCH_CHECK(rows_with_grad.scalar_type() == at::kLong && rows_with_grad.is_contiguous(),
              "hf_lts: the rows must be a contiguous int64 tensor");
  const int64_t active = rows_with_grad.numel();
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.numel() == active * l.per_row,
              "hf_lts: the gradient must be a contiguous float32 tensor of the rows given");
  const int32_t* p = packed_ptr(packed, x);
  std::vector<int64_t> slot(l.rows, -1);  // row → its row in ``grad``
  const int64_t* rows = rows_with_grad.data_ptr<int64_t>();
  for (int64_t a = 0; a < active; ++a) {
    TORCH_CHECK(rows[a] >= 0 && rows[a] < l.rows, "hf_lts: row ", rows[a], " out of range");
    slot[rows[a]] = a;
  }
  const std::vector<float> s = steps(scale);
  const float* xp = x.data_ptr<float>();
  const float* __restrict g = grad.data_ptr<float>();
  at::Tensor grad_x = at::empty_like(x);
  float* __restrict gx = grad_x.data_ptr<float>();
  std::vector<double> partial(l.tasks(), 0.0);
  for_each_chunk(l, [&](int64_t row, int64_t begin, int64_t end, int64_t task) {
    if (slot[row] < 0) {
      std::fill(gx + begin, gx + end, 0.0f);
      return;
    }
    const int64_t shift = (row - slot[row]) * l.per_row;  // value i of this row is grad[i - shift]
    const auto grad_at = [&](int64_t i, float inside) {
      gx[i] = g[i - shift] * inside;
      return g[i - shift];
    };
    partial[task] = backward_chunk<true>(xp, p, begin, end, s[l.channel(row)], static_cast<float>(qmin),
                                         static_cast<float>(qmax), grad_at, [](int64_t, float) {});
  });
  return {grad_x, channel_sums(l, partial, x)};
}

// A layer input's backward: the input gradient written over ``grad``, the step's sum, and ``q·s`` where
// ``keep_x_hat`` (an undefined tensor else: a layer with no weight gradient to compute, such as a frozen
// one, need not allocate and write an activation-sized tensor).
std::tuple<at::Tensor, at::Tensor> input_grad_into(const at::Tensor& x, const at::Tensor& scale, double qmin,
                                                   double qmax, at::Tensor& grad, bool keep_x_hat) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.numel() == x.numel(),
              "hf_lts: the gradient must be a contiguous float32 tensor shaped like the input");
  float* __restrict g = grad.data_ptr<float>();
  const auto grad_at = [&](int64_t i, float inside) {
    const float gi = g[i];
    g[i] = gi * inside;
    return gi;
  };
  if (!keep_x_hat) {
    return {backward_pass<false>(x, scale, qmin, qmax, nullptr, grad_at, [](int64_t, float) {}), at::Tensor()};
  }
  at::Tensor x_hat = at::empty_like(x);
  float* __restrict xh = x_hat.data_ptr<float>();
  at::Tensor grad_scale =
      backward_pass<false>(x, scale, qmin, qmax, nullptr, grad_at, [&](int64_t i, float x_q) { xh[i] = x_q; });
  return {grad_scale, x_hat};
}

std::tuple<at::Tensor, at::Tensor> input_grad(const at::Tensor& x, const at::Tensor& scale, double qmin,
                                              double qmax, at::Tensor& grad) {
  return input_grad_into(x, scale, qmin, qmax, grad, true);
}

// ``(∂(q·s)/∂s, q·s)`` of an input that needs no gradient.
std::tuple<at::Tensor, at::Tensor> input_step_terms(const at::Tensor& x, const at::Tensor& scale, double qmin_d,
                                                    double qmax_d) {
  const Layout l = layout(x, scale);
  const std::vector<float> s = steps(scale);
  const float qmin = static_cast<float>(qmin_d), qmax = static_cast<float>(qmax_d);
  at::Tensor dq_out = at::empty_like(x), x_hat = at::empty_like(x);
  const float* __restrict xp = x.data_ptr<float>();
  float* __restrict dqp = dq_out.data_ptr<float>();
  float* __restrict xh = x_hat.data_ptr<float>();
  for_each_chunk(l, [&](int64_t c, int64_t begin, int64_t end, int64_t) {
    const float sc = s[c], r = 1.0f / sc;
    for (int64_t i = begin; i < end; ++i) {
      float q, inside;
      step_terms<false>(xp[i], r, qmin, qmax, 0, q, inside, dqp[i]);
      xh[i] = q * sc;
    }
  });
  return {dq_out, x_hat};
}

}  // namespace
