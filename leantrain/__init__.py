"""leantrain: memory-lean precision training for Llama-style models (full bfloat16 that converges like fp32)."""

from .hf import load_hf, save_hf
from .model import build_model
from .utils import set_default_dtype

__all__ = ["build_model", "load_hf", "save_hf", "set_default_dtype"]
