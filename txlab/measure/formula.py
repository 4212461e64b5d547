"""The closed form of Korthikanti et al. 2022 for activation memory, stored beside every training row
(measured or estimated) so analysis can show where formulas and reality part.
"""

from __future__ import annotations

from txlab.config import ModelConfig, PolicyConfig, WorkloadConfig
from txlab.policy.remat import segments

# --- the closed form ------------------------------------------------------------------------------


def formula_activation_bytes(
    m: ModelConfig,
    p: PolicyConfig,
    w: WorkloadConfig,
    ranks: int = 1,
    plan: list[tuple[int, int, str]] | None = None,
    tp: int = 1,
    sequence_parallel: bool = True,
) -> int | None:
    """Activation bytes of the transformer layers by Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", section 4), scaled to the trial.

    Per layer at 16 bits with dropout masks: s*b*h*(34 + 5*a*s/h) bytes, i.e. 32 sbh of 16-bit
    tensors + 2 sbh of 1-byte dropout masks, plus 4 a s^2 b of 16-bit scores and softmax output
    + a s^2 b of attention-dropout mask. Scaled here to:
    - dtype: 16-bit tensors take 4 bytes at fp32 (bf16 autocast keeps them at 2);
    - dropout: masks only when model.dropout > 0; txlab never drops attention probabilities, so the
      a s^2 b mask term is always left out;
    - attention: the s^2 terms only for `math` (materialized) attention; fused and chunked kernels
      keep no s x s tensor (the formula predates them);
    - recomputation (the paper's full recomputation): a recomputed run of layers keeps only its
      input, 2 sbh at 16 bits; `selective` is the paper's selective recomputation (no s^2 terms).
    Embeddings, the final norm and the logits are outside the formula (as in the paper). None for
    workloads other than training. `ranks`: the data-parallel ranks sharing the batch; `plan`: a planned
    trial's runs (start, stop, mode). `tp`: tensor-parallel ranks (the paper's section 4.2: the 24 sbh of
    tensors inside the attention and MLP regions and the s^2 terms split over them; the norms' and regions'
    inputs, 8 sbh, and the dropout masks, 2 sbh, too under `sequence_parallel`, and then a recomputed run's
    input as well).
    """
    if w.kind != "train":
        return None
    # one device's share: a sharded trial's ranks each hold batch_size / ranks sequences
    s, b, h, a = w.seq_len, w.batch_size // (ranks * w.grad_accum), m.d_model, m.n_heads  # a micro-batch's
    word = 2 if w.dtype == "bf16" else 4  # bytes of a "16-bit" tensor of the paper in this trial
    mask = 1 if m.dropout > 0 else 0
    split = s * b * h * 24 * word // 2  # inside the TP regions: split over the tp ranks
    whole = s * b * h * (8 * word // 2 + 2 * mask)  # norms, the regions' inputs, dropout masks
    linear = (split + whole) / tp if sequence_parallel else split / tp + whole
    quadratic = 4 * a * s * s * b * word // 2 / tp if p.attention == "math" and p.remat != "selective" else 0
    full_layer = linear + quadratic
    layer_input = s * b * h * word / (tp if sequence_parallel else 1)
    runs = _plan_segments(plan) if plan is not None else _formula_segments(p, m.n_layers)
    total = 0
    for start, stop, recomputed in runs:
        total += layer_input if recomputed else full_layer * (stop - start)
    return int(total)


def _formula_segments(p: PolicyConfig, L: int) -> list[tuple[int, int, bool]]:
    if p.remat == "selective":  # the paper's selective recomputation keeps every layer's linear terms
        return [(0, L, False)]
    if p.remat == "planned":
        return [(0, L, False)]  # replaced by the plan's own runs where a plan exists
    return segments(L, p.remat, p.remat_every)


def _plan_segments(plan: list[tuple[int, int, str]]) -> list[tuple[int, int, bool]]:
    """A plan's runs in the formula's terms: `full` runs keep their input only; `keep` and `selective`
    blocks keep the linear terms (the paper's selective recomputation)."""
    return [(a, b, mode == "full") for a, b, mode in plan]
