"""leantrain: memory-lean precision training for Llama-style models (full bfloat16 that converges like fp32)."""

__all__ = ["build_model", "load_hf", "save_hf", "set_default_dtype"]


def __getattr__(name: str):
    # Imported on first use, so that commands which need no torch (leantrain prepare and its workers) load none.
    if name in ("load_hf", "save_hf"):
        from . import hf

        return getattr(hf, name)
    if name == "build_model":
        from .model import build_model

        return build_model
    if name == "set_default_dtype":
        from .utils import set_default_dtype

        return set_default_dtype
    raise AttributeError(f"module 'leantrain' has no attribute {name!r}")
