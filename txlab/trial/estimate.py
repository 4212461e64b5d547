"""The estimating stage: the trial's real training step on fake tensors (`txlab.trial.fake`), so every
tensor has a shape, dtype and device and no storage. The same `MemoryMonitor` (torch's MemTracker)
watches the same steps and reports the same breakdown as a measured row. No formula is involved: every
attention kernel, recomputation policy and loss mode is covered because the real code runs.

Targets (`Setup.kind`):
- `cpu`: the peak of the live-tensor tracker, which is what a measured CPU row reports.
- `cuda`: the same run on fake CPU tensors (fake CUDA tensors need a CUDA build of torch), with
  three CUDA differences modelled: fused AdamW (as `make_adamw` builds it on CUDA), bf16
  autocast on the CPU's autocast op lists (close to CUDA's for the ops in this model), and the
  caching allocator's rounding of each storage (`txlab.measure.memory.cuda_block_bytes`). Not modelled:
  kernels' internal workspaces (cuBLAS, fused attention backward), which the CUDA allocator sees
  and the tracker does not, and block reuse that depends on allocation history; `reserved_bytes`
  is left empty. See docs/estimator.md.

The same run records the steady step's operators: the bytes of its collectives are the row's comm_*_bytes
columns, and with a hardware profile (`measure.hardware`) the time model prices them on the profile
(txlab.trial.predict, docs/time_model.md): the row's predicted_* columns.
"""

from __future__ import annotations

from txlab.measure.records import Records
from txlab.trial.build import training_facts
from txlab.trial.fake import assumed_routing
from txlab.trial.plan import planned
from txlab.trial.predict import predicted, traced_step_memory, traffic_of
from txlab.trial.resolve import Setup


def estimate_training(setup: Setup, rec: Records, progress: bool = False) -> None:
    """Fill `rec` with the predicted memory of the training steps and what the model computes."""
    plan = planned(setup, progress)
    runs = plan.runs if plan is not None else None
    rec.memory, model, ops = traced_step_memory(setup, runs)  # the same run, its steady step's operators recorded
    rec.facts = training_facts(setup, model, plan)
    rec.routing = assumed_routing(setup)
    rec.traffic = traffic_of(setup, ops)
    if setup.hardware is not None:
        rec.prediction = predicted(setup, ops, rec.facts)
