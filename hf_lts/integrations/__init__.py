"""Model surgery for transformers integration (like transformers' own ``integrations/``): the module swaps
the ``"lts"`` quantizer of `hf_lts.quantizers` performs around weight loading (`lts`) and the checkpoint key
renamings it follows (`keys`). Nothing is imported here, so that `hf_lts.quantization` can use `keys`
without loading the swaps built on top of it."""
