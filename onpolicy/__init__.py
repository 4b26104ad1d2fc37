"""onpolicy: an on-policy trainer for discrete-diffusion code models (Seed Diffusion, reproduced).

The package itself is light: `import onpolicy.data.generated` or `onpolicy verify` never load torch.
The model classes load on first use, and importing them registers them with transformers' Auto
classes:

    from onpolicy import DiffusionTransformer      # or: import onpolicy.model
    AutoModel.from_pretrained("runs/tiny-stage1-mask/final")
"""

__all__ = ["DiffusionTransformer", "DiffusionTransformerConfig", "KVCache"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from onpolicy import model

        return getattr(model, name)
    raise AttributeError(f"module 'onpolicy' has no attribute '{name}'")
