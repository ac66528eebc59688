// Native CPU kernels of hf_lts: LSQ fake quantization (forward, backward) and the LTS state update.
//
// They compute exactly what the eager functions in lsq.py and scratcher.py compute (single IEEE float ops,
// round half to even, no contraction into FMAs), one pass each. They exist because on a CPU a
// torch.compile kernel costs 25-45 us of Python and guard work per call, several times the work itself
// on a small layer; a call to a native op costs about 3 us from Python. Sums are taken over fixed chunks
// and combined in a fixed order, so every result is independent of the thread count (DDP ranks, resume).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr float kScaleEps = 1e-8f;  // lsq.SCALE_EPS
constexpr int32_t kLevelShift = 24;  // state.LEVEL_SHIFT
constexpr int32_t kFrozenBit = 1 << 23;
constexpr int32_t kDistanceMask = kFrozenBit - 1;
constexpr int32_t kDistanceOne = 1 << 19;
constexpr float kDistanceMax = static_cast<float>(kDistanceMask) / static_cast<float>(kDistanceOne);
constexpr uint32_t kHashMultiplier = 0x45D9F3B;
constexpr int64_t kChunk = 1 << 14;  // elements per task (and per partial sum)
constexpr int64_t kLanes = 16;       // independent accumulators: a vectorised reduction

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

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// state.bfloat16_bits / state.from_bfloat16_bits.
inline int32_t bfloat16_bits(float x) {
  const uint32_t bits = float_bits(x);
  return static_cast<int32_t>(((bits + (0x7FFFu + ((bits >> 16) & 1u))) >> 16) & 0xFFFFu);
}

inline float from_bfloat16_bits(int32_t bits) {
  const float magnitude = bits_float((static_cast<uint32_t>(bits) & 0x7FFFu) << 16);
  return (bits & 0x8000) != 0 ? -magnitude : magnitude;
}

// scratcher._hash_uniform.
inline float hash_uniform(int64_t index, int64_t key) {
  uint32_t h = static_cast<uint32_t>(index) + static_cast<uint32_t>(key);  // (index + key) mod 2^32
  h ^= h >> 16;
  h *= kHashMultiplier;
  h ^= h >> 16;
  h *= kHashMultiplier;
  h ^= h >> 16;
  return static_cast<float>(h >> 8) * 0x1p-24f;
}

// The LTS update of ``[begin, end)``, in place (see update_layer_state); returns (newly frozen, frozen).
template <bool kRestore>
inline std::pair<int64_t, int64_t> update_range(float* __restrict w, int32_t* __restrict p, int64_t begin,
                                                int64_t end, float sc, int64_t key, float keep, int64_t threshold,
                                                bool restart_observed, float qmin, float qmax) {
  const float r = 1.0f / sc;
  int32_t newly = 0, frozen_count = 0;  // a chunk has fewer than 2^31 values
  for (int64_t i = begin; i < end; ++i) {
    const int32_t old_state = p[i];
    float v, rounded, q;
    quantize(w[i], r, qmin, qmax, v, rounded, q);
    float d_now = std::fabs(v - q);
    d_now = d_now > kDistanceMax ? kDistanceMax : d_now;
    d_now = d_now * static_cast<float>(kDistanceOne);
    const int32_t old = old_state & kDistanceMask;
    const float rate = (restart_observed & (old == kDistanceOne)) ? 1.0f : keep;
    const float delta = std::floor(rate * (d_now - static_cast<float>(old)) + hash_uniform(i, key));
    int32_t fixed = old + static_cast<int32_t>(delta);
    fixed = fixed < 0 ? 0 : fixed;
    fixed = fixed > kDistanceMask ? kDistanceMask : fixed;
    const int32_t level = static_cast<int32_t>(q);
    fixed = level != (old_state >> kLevelShift) ? kDistanceOne : fixed;
    const bool frozen = is_frozen(old_state);
    const bool now = !frozen & (fixed <= threshold);
    const int32_t low = now ? bfloat16_bits(q * sc) + kFrozenBit : fixed;
    const int32_t trainable =
        static_cast<int32_t>((static_cast<uint32_t>(level) << kLevelShift) + static_cast<uint32_t>(low));
    const int32_t next = frozen ? old_state : trainable;
    p[i] = next;
    const bool frozen_next = is_frozen(next);
    if constexpr (kRestore) w[i] = frozen_next ? from_bfloat16_bits(next) : w[i];
    newly += now;
    frozen_count += frozen_next;
  }
  return {newly, frozen_count};
}

// scratcher.update_layer_state of every layer in one call, in place: one parallel loop over all layers'
// chunks instead of one (and one fork/join) per layer. Returns the weights frozen now per layer and, per
// layer, the frozen weights per row of its state (an output channel), whatever its steps.
std::tuple<at::Tensor, std::vector<at::Tensor>> update_layers(at::TensorList weights, at::TensorList packed,
                                                              at::TensorList scales, at::IntArrayRef keys,
                                                              double keep, int64_t threshold,
                                                              bool restart_observed, at::IntArrayRef qmin,
                                                              at::IntArrayRef qmax, at::IntArrayRef restore) {
  const int64_t layers = static_cast<int64_t>(weights.size());
  TORCH_CHECK(packed.size() == weights.size() && scales.size() == weights.size() && keys.size() == weights.size() &&
                  qmin.size() == weights.size() && qmax.size() == weights.size() &&
                  restore.size() == weights.size(),
              "hf_lts: update_layers needs one of each argument per layer");
  struct Task {
    int64_t layer, begin, end;
  };
  std::vector<Layout> layouts;
  std::vector<std::vector<float>> steps_of;
  std::vector<at::Tensor> per_row;
  std::vector<Task> tasks;
  for (int64_t k = 0; k < layers; ++k) {
    TORCH_CHECK(packed[k].scalar_type() == at::kInt && packed[k].is_contiguous() &&
                    packed[k].numel() == weights[k].numel(),
                "hf_lts: the LTS state must be a contiguous int32 tensor shaped like the weight");
    layouts.push_back(layout(weights[k], scales[k], packed[k].size(0)));
    steps_of.push_back(steps(scales[k]));
    per_row.push_back(at::zeros({layouts[k].rows}, packed[k].options().dtype(at::kLong)));
    for (int64_t begin = 0; begin < weights[k].numel(); begin += kChunk) {
      tasks.push_back({k, begin, std::min(weights[k].numel(), begin + kChunk)});
    }
  }
  std::vector<int64_t> newly(tasks.size());
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const Task& task = tasks[t];
      const Layout& l = layouts[task.layer];
      float* w = weights[task.layer].data_ptr<float>();
      int32_t* p = packed[task.layer].data_ptr<int32_t>();
      int64_t* rows = per_row[task.layer].data_ptr<int64_t>();
      for (int64_t row = task.begin / l.per_row; row * l.per_row < task.end; ++row) {
        const int64_t begin = std::max(task.begin, row * l.per_row);
        const int64_t end = std::min(task.end, (row + 1) * l.per_row);
        const auto args = std::make_tuple(w, p, begin, end, steps_of[task.layer][l.channel(row)],
                                          keys[task.layer], static_cast<float>(keep), threshold,
                                          restart_observed, static_cast<float>(qmin[task.layer]),
                                          static_cast<float>(qmax[task.layer]));
        const auto [now, frozen] =
            restore[task.layer] ? std::apply(update_range<true>, args) : std::apply(update_range<false>, args);
        newly[t] += now;
        __atomic_fetch_add(&rows[row], static_cast<int64_t>(frozen), __ATOMIC_RELAXED);  // a row may span tasks
      }
    }
  });
  at::Tensor newly_per_layer = at::zeros({layers}, at::TensorOptions().dtype(at::kLong));
  int64_t* n = newly_per_layer.data_ptr<int64_t>();
  for (size_t t = 0; t < tasks.size(); ++t) n[tasks[t].layer] += newly[t];
  return {newly_per_layer, per_row};
}

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

TORCH_LIBRARY(hf_lts, m) {
  m.def("fake_quant(Tensor x, Tensor scale, float qmin, float qmax, Tensor? packed=None) -> Tensor");
  m.def(
      "layer_forward(Tensor x, Tensor x_scale, float x_min, float x_max, Tensor w, Tensor w_scale, float w_min, "
      "float w_max, Tensor? packed=None) -> (Tensor, Tensor)");
  m.def("grad(Tensor x, Tensor scale, float qmin, float qmax, Tensor grad, Tensor? packed=None) -> (Tensor, Tensor)");
  m.def(
      "grad_rows(Tensor x, Tensor scale, float qmin, float qmax, Tensor grad, Tensor packed, Tensor rows) -> "
      "(Tensor, Tensor)");
  m.def("input_grad(Tensor x, Tensor scale, float qmin, float qmax, Tensor(a!) grad) -> (Tensor, Tensor)");
  m.def("input_step_terms(Tensor x, Tensor scale, float qmin, float qmax) -> (Tensor, Tensor)");
  m.def(
      "update_layers(Tensor(a!)[] weights, Tensor(b!)[] packed, Tensor[] scales, int[] keys, float keep, "
      "int threshold, bool restart_observed, int[] qmin, int[] qmax, int[] restore) -> (Tensor, Tensor[])");
  // Differentiable (a C++ autograd function inside): registered for every dispatch key.
  m.def(
      "quant_layer(Tensor x, Tensor weight, Tensor input_scale, Tensor weight_scale, Tensor? bias, "
      "Tensor? packed, Tensor? held, Tensor? active, float[] bounds, float[] factors, int[] conv, "
      "bool zero_skipped, bool stragglers=False) -> Tensor",
      &quant_layer);
}

TORCH_LIBRARY_IMPL(hf_lts, CPU, m) {
  m.impl("fake_quant", &fake_quant);
  m.impl("layer_forward", &layer_forward);
  m.impl("grad", &weight_grad);
  m.impl("grad_rows", &weight_grad_rows);
  m.impl("input_grad", &input_grad);
  m.impl("input_step_terms", &input_step_terms);
  m.impl("update_layers", &update_layers);
}
