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
Mlp = Literal["gelu", "swiglu", "moe"]
MoeRouter = Literal["softmax", "sigmoid"]
AttnKind = Literal["mha", "mla"]
QkNormScope = Literal["head", "projection"]
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
RopeScaling = Literal["none", "llama3", "yarn"]


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
    mlp: Mlp = "gelu"  # 4x GELU MLP, SwiGLU (hidden 8/3 x d_model, rounded to 64), or moe: SwiGLU experts (moe_*)
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
    # yarn (YaRN, DeepSeek-V3): rope_factor and rope_original_len as for llama3, and the rotations bounding the
    # band between extrapolated and interpolated frequencies (beta_fast, beta_slow)
    rope_beta_fast: float = field(default=32.0, metadata={SINCE: "0.3"})
    rope_beta_slow: float = field(default=1.0, metadata={SINCE: "0.3"})
    # yarn: mscale and mscale_all_dim of the config (0 = not given); their ratio of 0.1 m ln(factor) + 1 scales cos
    # and sin, and latent attention's softmax scale takes mscale_all_dim's squared (transformers' yarn_apply_mscale)
    rope_mscale: float = field(default=0.0, metadata={SINCE: "0.3"})
    rope_mscale_all_dim: float = field(default=0.0, metadata={SINCE: "0.3"})
    # Added in 0.3: mixture-of-experts MLPs (Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3) and multi-head latent
    # attention (DeepSeek-V3). Each default is 0.2's dense model (and stays out of the trial key); a moe_* key set
    # on a model whose mlp is not moe, or an mla_* key on mha attention, is refused.
    # routed experts of each MoE layer (mlp: moe)
    moe_experts: int | None = field(default=None, metadata={SINCE: "0.3"})
    # experts each token is sent to (top-k of the router's scores); at most moe_experts
    moe_top_k: int | None = field(default=None, metadata={SINCE: "0.3"})
    # hidden width of each expert's SwiGLU; None = the MLP width (mlp_hidden), which dense layers keep
    moe_hidden: int | None = field(default=None, metadata={SINCE: "0.3"})
    # shared experts every token passes through, as one SwiGLU moe_shared x moe_hidden wide (DeepSeek-V3: 1)
    moe_shared: int = field(default=0, metadata={SINCE: "0.3"})
    # router scores: softmax over the experts (Mixtral, Qwen, OLMoE), or sigmoid per expert chosen with a
    # learned correction bias added (DeepSeek-V3; the bias picks experts, the unbiased scores weight them)
    moe_router: MoeRouter = field(default="softmax", metadata={SINCE: "0.3"})
    # the chosen experts' weights divided by their sum (Mixtral, Qwen3-30B-A3B, DeepSeek-V3: true; OLMoE: false)
    moe_renorm: bool = field(default=True, metadata={SINCE: "0.3"})
    # expert groups: a token chooses its experts within its moe_topk_groups best groups, a group scored by the
    # sum of its two best experts (DeepSeek-V3: 8 groups, 4 kept); 1 = no groups
    moe_groups: int = field(default=1, metadata={SINCE: "0.3"})
    moe_topk_groups: int = field(default=1, metadata={SINCE: "0.3"})
    # the routed experts' weights multiplied by this (DeepSeek-V3's routed_scaling_factor, 2.5)
    moe_scale: float = field(default=1.0, metadata={SINCE: "0.3"})
    # the first layers keep a dense SwiGLU MLP (DeepSeek-V3's first_k_dense_replace, 3)
    moe_first_dense: int = field(default=0, metadata={SINCE: "0.3"})
    # layer i (from 0) is MoE when (i + 1) % moe_every == 0, else dense (Qwen's decoder_sparse_step)
    moe_every: int = field(default=1, metadata={SINCE: "0.3"})
    # layers with a dense MLP whatever the rules above, comma-separated indices, e.g. "0,5" (Qwen's mlp_only_layers)
    moe_dense_layers: str = field(default="", metadata={SINCE: "0.3"})
    # RMSNorm of qk_norm: over each head's head_dim (head: Qwen3), or over the whole q and k projections before
    # they are split into heads (projection: OLMoE)
    qk_norm_scope: QkNormScope = field(default="head", metadata={SINCE: "0.3"})
    # attention: mha (q, k, v projections; grouped-query when n_kv_heads < n_heads) or mla (DeepSeek's
    # multi-head latent attention: keys and values from a small per-token latent, a separate RoPE part)
    attn: AttnKind = field(default="mha", metadata={SINCE: "0.3"})
    # mla: queries through a rank-r bottleneck (d_model -> r -> heads, RMSNorm between); None = one projection
    mla_q_rank: int | None = field(default=None, metadata={SINCE: "0.3"})
    # mla: width of the per-token latent keys and values are made from (kv_lora_rank)
    mla_kv_rank: int | None = field(default=None, metadata={SINCE: "0.3"})
    # mla: per-head q/k width without position (qk_nope_head_dim)
    mla_nope_dim: int | None = field(default=None, metadata={SINCE: "0.3"})
    # mla: per-head q/k width rotated by RoPE; the keys' part is one per token, shared by every head (qk_rope_head_dim)
    mla_rope_dim: int | None = field(default=None, metadata={SINCE: "0.3"})
    # mla: per-head value width (v_head_dim)
    mla_v_dim: int | None = field(default=None, metadata={SINCE: "0.3"})

    def attn_head_dim(self) -> int:
        """Per-head width of queries and keys: head_dim, else d_model / n_heads (mla: nope + rope parts)."""
        if self.attn == "mla":
            return (self.mla_nope_dim or 0) + (self.mla_rope_dim or 0)
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def value_head_dim(self) -> int:
        """Per-head width of values (and of the attention output): the q/k head width, mla_v_dim for mla."""
        return (self.mla_v_dim or 0) if self.attn == "mla" else self.attn_head_dim()

    def rope_dim(self) -> int:
        """Width of each head that RoPE rotates: the whole head, mla's rope part."""
        return (self.mla_rope_dim or 0) if self.attn == "mla" else self.attn_head_dim()

    def moe_layer(self, i: int) -> bool:
        """Whether layer i (from 0) has the mixture-of-experts MLP (else a dense SwiGLU of mlp_width)."""
        if self.mlp != "moe" or i < self.moe_first_dense or (i + 1) % self.moe_every:
            return False
        return str(i) not in self.moe_dense_layers.replace(" ", "").split(",")

    def expert_width(self) -> int:
        """Hidden width of one expert: moe_hidden, else the MLP width."""
        return self.moe_hidden if self.moe_hidden is not None else self.mlp_width()

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
    # estimates of mixture-of-experts models (fake tensors cannot route): the busiest expert's (token, expert)
    # pairs over the mean, assumed on the estimated rank (1.0 = balanced; at most moe_experts / moe_top_k). It
    # sizes what an expert-parallel rank receives; a measured trial routes as its data do and reports routing_load
    routing_imbalance: float = field(default=1.0, metadata={SINCE: "0.3"})


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
    """How a trial spreads over devices: one mesh of fsdp x cp x tp ranks, tp innermost (a TP group is
    consecutive ranks, so it sits in one node)."""

    # data-parallel ranks the model, gradients and AdamW state are sharded over (FSDP2); 1 = no sharding
    fsdp: int = field(default=1, metadata={SINCE: "0.2"})
    # free gathered block parameters after forward (gather again in backward)
    reshard_after_forward: bool = field(default=True, metadata={SINCE: "0.2"})
    # tensor-parallel ranks each projection, embedding and the loss's vocabulary are split over; 1 = none
    tp: int = field(default=1, metadata={SINCE: "0.3"})
    # inside TP regions, split the residual stream and the norms over the sequence (Megatron's sequence
    # parallelism); false keeps them whole on every TP rank. Applies to tp > 1 only
    sequence_parallel: bool = field(default=True, metadata={SINCE: "0.3"})
    # expert-parallel ranks each mixture-of-experts layer's routed experts are spread over, drawn from the fsdp
    # ranks (ep divides fsdp and model.moe_experts; the experts are FSDP-sharded over the other fsdp / ep); 1 = none
    ep: int = field(default=1, metadata={SINCE: "0.3"})
    # context-parallel ranks the sequence is split over (2 x cp load-balanced chunks, attention over every
    # rank's keys); 1 = none. workload.batch_size stays the global batch
    cp: int = field(default=1, metadata={SINCE: "0.3"})


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
