"""hf-lts: LTS (the lottery ticket scratcher) quantization-aware training for Hugging Face vision models."""

from .config import LTSConfig
from .quantization import QuantConv2d, QuantLinear, prepare_model
from .scratcher import LotteryTicketScratcher

__version__ = "0.1.0"

__all__ = ["LTSConfig", "LotteryTicketScratcher", "QuantConv2d", "QuantLinear", "prepare_model"]
