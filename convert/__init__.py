"""Hugging Face MoE checkpoint converters: strict config gate, regex key tables, one shared builder."""

from convert.builder import load_hf_checkpoint
from convert.errors import ConversionError
from convert.hf_config import parse_hf_config

__all__ = ["ConversionError", "load_hf_checkpoint", "parse_hf_config"]
