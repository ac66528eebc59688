"""Model surgery for transformers integration (like transformers' own ``integrations/``): the module swaps
the ``"lts"`` quantizer of `hf_lts.quantizers` performs around weight loading."""

from .lts import replace_with_placeholders, restore_quantized_layers

__all__ = ["replace_with_placeholders", "restore_quantized_layers"]
