"""txlab: what fits, how fast, and at what cost, before training a transformer."""

__version__ = "0.2.0"


def __getattr__(name: str):
    # `txlab.from_pretrained` without importing torch on `import txlab` (the CLI imports this package first)
    if name == "from_pretrained":
        from txlab.model.hf import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'txlab' has no attribute {name!r}")
