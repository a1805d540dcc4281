"""ShadowKV long-context decoding for unmodified Hugging Face models, as an FX graph pass."""
from shadowkv_fx.cache import ShadowKVCache
from shadowkv_fx.compat import output_cache
from shadowkv_fx.config import ShadowKVConfig
from shadowkv_fx.optimize import UnsupportedModelError, optimize, pass_report, restore
from shadowkv_fx.smollm2 import load_smollm2

__all__ = ["ShadowKVCache", "ShadowKVConfig", "UnsupportedModelError", "load_smollm2", "optimize", "output_cache",
           "pass_report", "restore"]
__version__ = "0.1.0"
