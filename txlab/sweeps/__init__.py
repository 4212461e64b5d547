"""The Ray Tune layer: sweep specs (`spec`), the driver (`driver`), the per-trial worker process
(`worker`) and the `txlab sweep` / `txlab rerun` commands (`cli`). It calls the core; the core never
imports it (nor Ray)."""
