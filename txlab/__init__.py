"""txlab: what fits, how fast, and at what cost, before training a transformer."""

__version__ = "0.1.0"
