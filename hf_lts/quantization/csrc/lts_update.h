// The LTS state update of every layer in one call (scratcher.update_layer_state): distance EMA, freezing,
// stochastic-rounding restarts.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "constants.h"
#include "lsq.h"

namespace {

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

}  // namespace
