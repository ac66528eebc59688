"""The ``"lts"`` transformers quantizer (like transformers' own ``quantizers/``): LTS in ``from_pretrained``
and ``save_pretrained``. Importing it registers the quantization method with transformers."""

from .quantizer_lts import LTSHfQuantizer, training_state

__all__ = ["LTSHfQuantizer", "training_state"]
