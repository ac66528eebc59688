"""hf-lts: LTS (the lottery ticket scratcher) quantization-aware training for Hugging Face vision models."""

from importlib.metadata import version

from . import quantizers  # noqa: F401  (registers the "lts" quantizer with transformers for from_pretrained)
from .config import LTSConfig
from .export.onnx import export_onnx
from .quantization import QuantConv2d, QuantLinear, prepare_model
from .scratcher import LotteryTicketScratcher
from .trainer import LTSTrainer
from .training_args import LTSTrainingArguments

__version__ = version("hf-lts")  # one source: pyproject.toml

__all__ = [
    "LTSConfig",
    "LTSTrainer",
    "LTSTrainingArguments",
    "LotteryTicketScratcher",
    "QuantConv2d",
    "QuantLinear",
    "export_onnx",
    "prepare_model",
]
