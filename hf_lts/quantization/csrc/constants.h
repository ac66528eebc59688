// The constants the kernels share with the Python side (hf_lts/quantization/state.py, fused.py,
// hf_lts/update.py): each beside the Python name it copies, and only here
// (tests/test_layout.py keeps them equal). The last two are the kernels' own.
#pragma once

#include <cstdint>

namespace {

constexpr float kScaleEps = 1e-8f;  // fused.SCALE_EPS
constexpr int32_t kLevelShift = 24;  // state.LEVEL_SHIFT
constexpr int32_t kFrozenBit = 1 << 23;  // state.FROZEN_BIT
constexpr int32_t kDistanceMask = kFrozenBit - 1;  // state.DISTANCE_MASK
constexpr int32_t kDistanceOne = 1 << 19;  // state.DISTANCE_ONE
constexpr float kDistanceMax = static_cast<float>(kDistanceMask) / static_cast<float>(kDistanceOne);  // state.DISTANCE_MAX
constexpr uint32_t kHashMultiplier = 0x45D9F3B;  // update._HASH_MULTIPLIER
constexpr int64_t kChunk = 1 << 14;  // elements per task (and per partial sum)
constexpr int64_t kLanes = 16;       // independent accumulators: a vectorised reduction

}  // namespace
