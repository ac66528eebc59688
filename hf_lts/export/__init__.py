"""Deployable formats of a prepared LTS model: the packed safetensors codes (`packed`), which
``from_pretrained`` loads back, and ONNX QDQ (`onnx`), which inference runtimes run."""

#: The ONNX QDQ model's name in an export folder (beside ``model.safetensors``).
ONNX_FILE = "model.onnx"
