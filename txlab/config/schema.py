"""The typed trial config: defaults < file < overrides, unknown keys and bad values rejected by name.

A config stays a tree of plain dataclasses whose leaves are str/int/float/bool/None, so that it
flattens to dotted keys (`model.n_layers`) that are at once the `--set` syntax, the sweep grid syntax
and the Parquet column names. Variants (norm, attention, remat, ...) are strings resolved at build time."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from txlab.config.identity import RUN_ONLY, SINCE, trial_key
from txlab.config.tree import flatten
from txlab.config.validate import validate

# --- the tree -----------------------------------------------------------------------------------

Norm = Literal["layernorm", "rmsnorm"]
Pos = Literal["learned", "rope"]
Mlp = Literal["gelu", "swiglu"]
Quant = Literal["none", "int4"]
PolicyName = Literal["naive", "sdpa", "checkpoint", "selective", "recompute", "planned", "custom"]
Attention = Literal["sdpa", "math", "chunked"]
Remat = Literal["none", "block", "every", "sqrt", "selective", "planned"]
Loss = Literal["full", "chunked"]
Kv = Literal["cache", "grouped", "recompute"]
SelectiveSave = Literal["txlab", "matmuls", "torchtitan"]  # txlab.policy.remat.SELECTIVE_POLICIES
Kind = Literal["train", "prefill", "decode"]
Dtype = Literal["fp32", "bf16"]
Init = Literal["random", "pretrained"]
RopeScaling = Literal["none", "llama3"]


@dataclass
class ModelConfig:
    size: str = "debug"  # named preset (MODEL_SIZES) that fills the keys below; explicit keys win
    n_layers: int = 4  # transformer blocks
    d_model: int = 256  # residual width
    n_heads: int = 4  # query heads; must divide d_model
    n_kv_heads: int = 4  # key/value heads (grouped-query attention when < n_heads); must divide n_heads
    vocab_size: int = 256  # tokens; 256 matches the byte tokenizer
    n_positions: int | None = None  # learned position table size; None = workload.seq_len
    norm: Norm = "layernorm"  # pre-norm flavour
    pos: Pos = "learned"  # learned absolute positions or rotary embeddings
    mlp: Mlp = "gelu"  # 4x GELU MLP or SwiGLU (hidden 8/3 x d_model, rounded to 64)
    dropout: float = 0.0  # on embeddings and residual branches (never on attention probabilities)
    tie_weights: bool = True  # output projection shares the token embedding
    quant: Quant = "none"  # int4: weight-only attention/MLP projections, 2 values per byte (prefill/decode only)
    quant_group: int = 128  # weights per int4 scale (along the input dim); even, divides the projections' input widths
    # Added in 0.2 for real architectures (Llama, Mistral, Qwen): each default reproduces the 0.1 model, and
    # a key left at its default stays out of the trial key (SINCE, see txlab.config.identity).
    # Hugging Face checkpoint (dir, config.json or hub id) whose config.json fills this section
    hf: str | None = field(default=None, metadata={SINCE: "0.2"})
    # random (GPT-2 init, seeded) or pretrained (model.hf's safetensors)
    init: Init = field(default="random", metadata={SINCE: "0.2"})
    head_dim: int | None = field(default=None, metadata={SINCE: "0.2"})  # per-head width; None = d_model / n_heads
    # MLP hidden width; None = 4 d (gelu), 8/3 d rounded up to 64 (swiglu)
    mlp_hidden: int | None = field(default=None, metadata={SINCE: "0.2"})
    norm_eps: float | None = field(default=None, metadata={SINCE: "0.2"})  # None = 1e-5 (layernorm), 1e-6 (rmsnorm)
    attn_bias: bool = field(default=True, metadata={SINCE: "0.2"})  # biases of the q, k, v projections
    attn_out_bias: bool = field(default=True, metadata={SINCE: "0.2"})  # bias of the attention output projection
    mlp_bias: bool = field(default=True, metadata={SINCE: "0.2"})  # biases of the MLP projections
    # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    qk_norm: bool = field(default=False, metadata={SINCE: "0.2"})
    rope_theta: float = field(default=10000.0, metadata={SINCE: "0.2"})  # RoPE base
    # none, or llama3 (Llama 3.1's long-context frequencies)
    rope_scaling: RopeScaling = field(default="none", metadata={SINCE: "0.2"})
    # llama3: wavelengths past the low-frequency bound are stretched by this
    rope_factor: float = field(default=8.0, metadata={SINCE: "0.2"})
    rope_low_freq_factor: float = field(default=1.0, metadata={SINCE: "0.2"})  # llama3
    rope_high_freq_factor: float = field(default=4.0, metadata={SINCE: "0.2"})  # llama3
    rope_original_len: int = field(default=8192, metadata={SINCE: "0.2"})  # llama3: the pre-training context length

    def attn_head_dim(self) -> int:
        """Per-head width: head_dim, else d_model / n_heads."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def mlp_width(self) -> int:
        """Hidden width of the MLP: mlp_hidden, else 4 d for gelu and 8/3 d rounded up to 64 for swiglu (the
        parameter count of 4x GELU)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 4 * self.d_model if self.mlp == "gelu" else 64 * math.ceil(8 * self.d_model / 3 / 64)

    def eps(self) -> float:
        """The norms' epsilon: norm_eps, else 1e-5 for layernorm and 1e-6 for rmsnorm (0.1's values)."""
        return self.norm_eps if self.norm_eps is not None else (1e-5 if self.norm == "layernorm" else 1e-6)


@dataclass
class PolicyConfig:
    name: PolicyName = "sdpa"  # preset (POLICY_PRESETS) that fills the keys below; explicit keys win
    attention: Attention = "sdpa"  # fused SDPA, materialized math (reference), or chunked online softmax
    q_chunk: int = 512  # query tile of chunked attention, tokens
    k_chunk: int = 512  # key tile of chunked attention, tokens
    remat: Remat = "none"  # activation recomputation, applied from outside the model
    remat_every: int = 1  # with remat=every: recompute blocks 0, k, 2k, ...
    loss: Loss = "full"  # full T x V logits, or projection + cross-entropy per loss_chunk tokens
    loss_chunk: int = 1024  # tokens per chunk of the chunked loss
    kv: Kv = "cache"  # prefill/decode: keep K/V (cache; grouped = GQA model) or recompute them from kept layer inputs
    # what a selective recomputation saves: txlab's list (matmuls + fused attention), torch's documented
    # example (matmuls only), or torchtitan's op-level policy (every second matmul recomputed)
    selective_save: SelectiveSave = field(default="txlab", metadata={SINCE: "0.2"})


@dataclass
class WorkloadConfig:
    kind: Kind = "train"  # train = forward + backward + AdamW step; prefill = one no-grad forward; decode = prefill + decode_tokens
    seq_len: int = 1024  # tokens per sequence
    batch_size: int = 1  # sequences per step
    steps: int = 3  # timed steps (median step time over these)
    warmup_steps: int = 1  # untimed steps before measuring
    dtype: Dtype = "fp32"  # fp32, or bf16 autocast with fp32 master weights
    compile: bool = False  # torch.compile the blocks
    decode_tokens: int = 16  # tokens generated one at a time by decode workloads
    # micro-steps per optimizer step (train): each data-parallel rank's share of the global batch (batch_size)
    # is split into this many micro-batches whose gradients accumulate before one AdamW step; 1 = none
    grad_accum: int = field(default=1, metadata={SINCE: "0.3"})


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic (random tokens), corpus, text:PATH, parquet:PATH, hf:NAME[:CONFIG]
    tokenizer: str = "bytes"  # bytes (256 values + end-of-text = 257 ids) or hf:NAME_OR_PATH
    text_column: str = "text"  # column holding the text (parquet: and hf: sources)
    val_fraction: float = 0.05  # share of documents held out for evaluation; 0 = evaluate on training data
    workers: int = field(default=0, metadata={RUN_ONLY: True})  # data-loader worker processes (txlab train)


@dataclass
class TrainConfig:
    """`txlab train` only: the optimizer schedule, evaluation and checkpoints (a trial ignores it)."""

    steps: int = 1000  # optimizer steps
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup: int = 100  # steps of linear warm-up from 0 to lr
    hold: int = 0  # steps at lr after warm-up
    decay: int | None = None  # steps of cosine decay to min_lr; None = the rest of the run
    weight_decay: float = 0.1  # AdamW, on weight matrices only (not embeddings, norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    grad_accum: int = 1  # micro-batches of workload.batch_size per optimizer step
    eval_every: int = 100  # steps between evaluations (and one at the end)
    eval_batches: int = 20  # held-out batches per evaluation
    log_every: int = field(default=10, metadata={RUN_ONLY: True})  # steps between progress lines
    # steps between checkpoints; 0 = at the end only
    checkpoint_every: int = field(default=0, metadata={RUN_ONLY: True})
    out_dir: str | None = field(default=None, metadata={RUN_ONLY: True})  # run directory; None = runs/<trial key>
    # stop (with a checkpoint) after this long
    time_limit_s: float | None = field(default=None, metadata={RUN_ONLY: True})


@dataclass
class MeasureConfig:
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    budget_gib: float | None = None  # memory budget in GiB (2^30 bytes); CUDA caps the process at it
    # hardware profile the time model predicts for: a catalogue name (h100-sxm, ...), local (txlab calibrate's),
    # or a profile YAML path; null: no prediction (a measured row still gets one from the local profile)
    hardware: str | None = field(default=None, metadata={SINCE: "0.3"})
    # price of one device for an hour, dollars, for predicted_usd_per_mtok; null: no price is guessed
    usd_per_device_hour: float | None = field(default=None, metadata={SINCE: "0.3"})


@dataclass
class ParallelConfig:
    """How a trial spreads over devices: one mesh of fsdp x tp ranks, tp innermost (a TP group is
    consecutive ranks, so it sits in one node). Context and expert parallel degrees are not built yet."""

    # data-parallel ranks the model, gradients and AdamW state are sharded over (FSDP2); 1 = no sharding
    fsdp: int = field(default=1, metadata={SINCE: "0.2"})
    # free gathered block parameters after forward (gather again in backward)
    reshard_after_forward: bool = field(default=True, metadata={SINCE: "0.2"})
    # tensor-parallel ranks each projection, embedding and the loss's vocabulary are split over; 1 = none
    tp: int = field(default=1, metadata={SINCE: "0.3"})
    # inside TP regions, split the residual stream and the norms over the sequence (Megatron's sequence
    # parallelism); false keeps them whole on every TP rank. Applies to tp > 1 only
    sequence_parallel: bool = field(default=True, metadata={SINCE: "0.3"})


@dataclass
class TrialConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0  # seeds weights, data and dropout

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, the form of `--set`, sweep grids and Parquet columns."""
        return flatten(self.to_dict())

    @property
    def trial_key(self) -> str:
        return trial_key(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "policy": PolicyConfig,
    "workload": WorkloadConfig,
    "data": DataConfig,
    "measure": MeasureConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
}
