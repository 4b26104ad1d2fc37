"""onpolicy: an on-policy trainer for discrete-diffusion code models (Seed Diffusion, reproduced)."""

from onpolicy.model import DiffusionTransformer, DiffusionTransformerConfig, KVCache, register_auto_classes

register_auto_classes()

__all__ = ["DiffusionTransformer", "DiffusionTransformerConfig", "KVCache"]
__version__ = "0.1.0"
