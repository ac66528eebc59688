// Native CPU kernels of hf_lts: LSQ fake quantization (forward, backward) and the LTS state update.
//
// They compute exactly what the eager functions in lsq.py and scratcher.py compute (single IEEE float ops,
// round half to even, no contraction into FMAs), one pass each. They exist because on a CPU a
// torch.compile kernel costs 25-45 us of Python and guard work per call, several times the work itself
// on a small layer; a call to a native op costs about 3 us from Python. Sums are taken over fixed chunks
// and combined in a fixed order, so every result is independent of the thread count (DDP ranks, resume).
//
// The kernels live by concern in the headers below (one translation unit: native.py builds this file);
// this file registers them as the hf_lts ops.

#include <torch/library.h>

#include "layer.h"
#include "lsq.h"
#include "lts_update.h"

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
