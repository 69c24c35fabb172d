"""The config schema: ``Arguments`` = ``model`` + ``data`` + ``train`` + ``infer`` groups.

Every field carries help text (``cfg_field(default, help=...)``), shown by ``--help``. Checks and
derived values live in small named helpers called from ``__post_init__``; a subclass that adds
fields must call ``super().__post_init__()``. Messages name fields by their usual dotted path
(``model.block_size``) because these groups always sit under those names in ``Arguments``.
"""

import re
from dataclasses import dataclass
from typing import Literal, Optional

from veomni.diffusion.editflow.args import EditFlowInferArgs, EditFlowTrainArgs, check_editflow
from veomni.ops.registry import default_ops, ops_help, resolve_ops

from .parser import ConfigError, cfg_field

AttnImpl = Literal["sdpa", "eager", "flex", "flash_attention_2"]
# Every Linear of attention and the MLP (the QLoRA paper adapts them all).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AttnMode = Literal["causal", "bidirectional", "block_causal"]
SamplerAlg = Literal["origin", "maskgit_plus", "topk_margin", "entropy", "p2", "low_confidence", "random",
                     "threshold", "factor", "multi_block", "low_entropy", "editflow"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _at_least(name: str, value: Optional[float], low: float) -> None:
    """``value >= low`` (None passes: the field is unset)."""
    _check(value is None or value >= low, f"{name} must be >= {low}, got {value!r}")


def _between(name: str, value: Optional[float], low: float, high: float, *, low_open: bool = False,
             high_open: bool = False) -> None:
    """``value`` in the interval; brackets in the message show which ends are open."""
    if value is None:
        return
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    _check(ok_low and ok_high, f"{name} must be in {interval}, got {value!r}")


# ----------------------------------------------------------------------------- model
@dataclass
class ModelArgs:
    model_path: Optional[str] = cfg_field(
        None, help="HF model directory or .gguf file to start from. Required by training and inference "
                   "(they call model.require_model_path()); left optional so configs can be checked alone.")
    tokenizer_path: Optional[str] = cfg_field(None, help="Tokenizer directory; defaults to model_path.")
    attn_impl: AttnImpl = cfg_field("sdpa", help="Attention kernel. Every backend honours attn_mode.")
    attn_mode: AttnMode = cfg_field(
        "bidirectional", help="Who attends to whom: causal (AR), bidirectional (masked diffusion), or "
                              "block_causal (bidirectional inside blocks of block_size, causal across).")
    block_size: Optional[int] = cfg_field(
        None, help="Block length for attn_mode=block_causal (required there, rejected otherwise).")
    mask_token: str = cfg_field("<|mask|>", help="Mask token string; added to the tokenizer (and the "
                                                 "embeddings resized) if the tokenizer lacks it.")
    dtype: Literal["float32", "bfloat16", "float16"] = cfg_field(
        "float32", help="dtype the weights are loaded in.")
    gradient_checkpointing: bool = cfg_field(False, help="Recompute activations in backward to save memory.")
    init_from_scratch: bool = cfg_field(False, help="Random-initialise the model from model_path's "
                                                    "config instead of loading its weights (pretraining).")
    meta_init: bool = cfg_field(
        True, help="With train.data_parallel=fsdp2: build the model on the meta device, shard it, then fill "
                   "each rank's shards only (safetensors: each rank reads its own slices; init_from_scratch, "
                   "GGUF, .bin: rank 0 builds and broadcasts). false = every rank loads the whole model first. "
                   "ddp/none always load the whole model. docs/parallelism.md, 'Loading big models'.")
    ops: dict[str, str] = cfg_field(default_ops(), help=ops_help())
    lora_rank: int = cfg_field(
        0, help="LoRA: rank of the adapters put on the Linear layers model.lora_target names; the base weights "
                "are frozen and checkpoints hold the adapters only. 0 = off. Needs the quant extra "
                "(docs/recipes.md, 'LoRA / QLoRA').")
    lora_alpha: float = cfg_field(16.0, help="LoRA scale: an adapter's output is multiplied by lora_alpha / lora_rank.")
    lora_dropout: float = cfg_field(0.0, help="LoRA: dropout on the adapters' input while training.")
    lora_target: list[str] = cfg_field(
        list(LORA_TARGETS), help="LoRA: regexes (re.search) on module names choosing the nn.Linear layers that get "
                                 "adapters, e.g. [q_proj, v_proj] or ['.*proj']. A pattern matching no Linear layer "
                                 "is an error; the LM head cannot be a target (see lora_trainable).")
    lora_trainable: list[str] = cfg_field(
        [], help="LoRA: regexes (re.search) on parameter names trained in full next to the adapters, e.g. [norm] "
                 "or [embed_tokens] (a tied head is the embedding); everything else stays frozen.")
    lora_mask_embedding: bool = cfg_field(
        True, help="LoRA: also train the mask token's input embedding row (a vector added to it): the row is new "
                   "and every masked position reads it. false = it stays at its initial value (the mean row).")
    quantize: Literal["none", "nf4"] = cfg_field(
        "none", help="QLoRA: nf4 stores the frozen Linear weights of the decoder blocks in 4-bit NormalFloat "
                     "(bitsandbytes, double quantisation), quantised after loading. Needs lora_rank > 0.")

    def __post_init__(self) -> None:
        self._derive_tokenizer_path()
        self._check_attention()
        self._resolve_ops()
        _check(self.mask_token != "", "model.mask_token must not be empty")
        self._check_lora()

    def _check_lora(self) -> None:
        _at_least("model.lora_rank", self.lora_rank, 0)
        _between("model.lora_alpha", self.lora_alpha, 0.0, float("inf"), low_open=True)
        _between("model.lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        for key in ("lora_target", "lora_trainable"):
            for pattern in getattr(self, key):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"model.{key} pattern {pattern!r} is not a valid regex: {exc}") from None
        if self.lora_rank == 0:
            # LoRA settings without LoRA would be ignored: say so instead.
            for key, unset in (("lora_alpha", 16.0), ("lora_dropout", 0.0), ("lora_target", list(LORA_TARGETS)),
                               ("lora_trainable", []), ("lora_mask_embedding", True), ("quantize", "none")):
                _check(getattr(self, key) == unset, f"model.{key}={getattr(self, key)!r} needs LoRA: set "
                                                    "model.lora_rank (e.g. 16) or remove it")
        else:
            _check(bool(self.lora_target), "model.lora_target is empty: name the Linear layers to adapt, e.g. "
                                           "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]")

    def _resolve_ops(self) -> None:
        # Every known op gets its choice written out (defaults filled in), so resolved_config.yaml
        # says which implementation ran even when the YAML named none.
        try:
            self.ops = resolve_ops(self.ops)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _derive_tokenizer_path(self) -> None:
        if self.tokenizer_path is None:
            self.tokenizer_path = self.model_path

    def _check_attention(self) -> None:
        if self.attn_mode == "block_causal":
            _check(self.block_size is not None,
                   "model.attn_mode='block_causal' needs model.block_size (e.g. --model.block_size=32)")
            _at_least("model.block_size", self.block_size, 1)
        else:
            _check(self.block_size is None,
                   f"model.block_size={self.block_size} only applies to model.attn_mode='block_causal' "
                   f"(attn_mode is '{self.attn_mode}'); remove it or change attn_mode")

    def require_model_path(self) -> str:
        """The model path, or a ConfigError telling the user how to set it."""
        _check(bool(self.model_path), "model.model_path is not set: give it in the YAML file or with "
                                      "--model.model_path=PATH (an HF model directory or a .gguf file)")
        return self.model_path


# ----------------------------------------------------------------------------- data
@dataclass
class DataArgs:
    train_path: Optional[str] = cfg_field(
        None, help="Training data: .jsonl / .parquet / text files (a file, directory or glob), a directory "
                   "written by scripts/pack_data.py, or with data.streaming an hf:<dataset> (docs/data.md).")
    eval_path: Optional[str] = cfg_field(None, help="Evaluation data (.jsonl); or use eval_split_ratio.")
    data_type: Literal["pretrain", "sft"] = cfg_field(
        "pretrain", help="pretrain: every token can be masked; sft: chat records, prompt never masked.")
    text_key: str = cfg_field("text", help="JSON key holding the text of a pretrain record.")
    max_seq_len: int = cfg_field(2048, help="Tokens per training sequence (packed or truncated to this).")
    packing: bool = cfg_field(True, help="Pack several documents into one sequence (attention and noise "
                                         "stay per document via position_ids).")
    cache_dir: Optional[str] = cfg_field(None, help="Where tokenized data is cached; none = no cache.")
    num_workers: int = cfg_field(
        0, help="DataLoader worker processes per rank (torchdata StatefulDataLoader) that build and collate "
                "the batches (with streaming also read and tokenize); 0 = in the training process. In-memory "
                "and packed data give the same batches for any value; streaming data resumes only with the "
                "same value.")
    prefetch_factor: int = cfg_field(2, help="Batches each worker prepares ahead (num_workers > 0).")
    streaming: bool = cfg_field(
        False, help="Read the training data lazily, for corpora larger than memory: files or hf:<dataset> "
                    "sources are read, tokenized and packed by the workers as training goes. Needs "
                    "train.max_steps; resume needs the same dp size, num_workers and micro_batch_size.")
    sources: list[str] = cfg_field(
        [], help="A weighted mixture: one data source per entry (each as train_path accepts); use instead "
                 "of train_path, with mixture_weights.")
    mixture_weights: list[float] = cfg_field(
        [], help="One weight >= 0 per data.sources entry (normalised to sum 1): the share of training rows "
                 "drawn from each source.")
    skip_bad_lines: bool = cfg_field(False, help="Skip (and count) unparsable JSONL lines instead of "
                                                 "raising on the first one.")
    eval_split_ratio: float = cfg_field(0.0, help="Fraction of train_path held out for evaluation "
                                                  "(0 = none). Exclusive with eval_path.")
    pad_response_with_eos: bool = cfg_field(
        False, help="SFT response canvas (BERT-chat, dllm): fill each row after its example with EOS tokens that "
                    "are attended to and scored, so the model learns where to stop; the canvas is max_seq_len "
                    "minus the prompt. Needs data_type=sft, packing=false, no streaming (docs/data.md).")
    trajectory_path: Optional[str] = cfg_field(
        None, help="train.objective=d3llm: the store written by scripts/precompute_trajectories.py (a teacher's "
                   "unmasking order for every SFT example of train and eval data; docs/recipes.md).")

    def __post_init__(self) -> None:
        _at_least("data.max_seq_len", self.max_seq_len, 1)
        _at_least("data.num_workers", self.num_workers, 0)
        _between("data.eval_split_ratio", self.eval_split_ratio, 0.0, 1.0, high_open=True)
        _check(self.text_key != "", "data.text_key must not be empty")
        _check(not (self.eval_path and self.eval_split_ratio > 0),
               "set either data.eval_path or data.eval_split_ratio, not both")
        _at_least("data.prefetch_factor", self.prefetch_factor, 1)
        _check(not (self.train_path and self.sources),
               "set either data.train_path (one source) or data.sources (a mixture), not both")
        _check(not self.mixture_weights or bool(self.sources),
               "data.mixture_weights needs data.sources (one weight per source)")
        _check(len(self.sources) <= 1 or bool(self.mixture_weights),
               f"{len(self.sources)} data.sources need data.mixture_weights (one weight per source)")
        _check(not self.mixture_weights or len(self.mixture_weights) == len(self.sources),
               f"data.mixture_weights has {len(self.mixture_weights)} value(s) for {len(self.sources)} "
               "data.sources; give one weight per source")
        _check(all(w >= 0 for w in self.mixture_weights) and (not self.mixture_weights or sum(self.mixture_weights) > 0),
               f"data.mixture_weights must be >= 0 and not all 0, got {self.mixture_weights}")
        _check(not self.pad_response_with_eos or (self.data_type == "sft" and not self.packing and not self.streaming),
               "data.pad_response_with_eos=true fills each SFT row's tail with scored EOS: it needs "
               f"data.data_type=sft, data.packing=false and data.streaming=false (got {self.data_type}, "
               f"packing={self.packing}, streaming={self.streaming})")
        _check(not (self.streaming and self.eval_split_ratio > 0),
               "data.eval_split_ratio holds out documents of an in-memory corpus; with data.streaming give "
               "a separate data.eval_path")


# ----------------------------------------------------------------------------- train
@dataclass
class D3LLMArgs:
    """train.objective=d3llm (veomni/diffusion/d3llm.py; docs/recipes.md, "d3LLM trajectories")."""

    min_mask_ratio: float = cfg_field(0.0, help="Start of the mask-ratio curriculum: r_cur rises linearly from this "
                                                "to max_mask_ratio over the run (d3LLM: 0.0).")
    max_mask_ratio: float = cfg_field(0.8, help="Each document's mask ratio is drawn from U(r_cur, max_mask_ratio) "
                                                "(d3LLM: 0.8).")
    block_sizes: list[int] = cfg_field(
        [32], help="Block size per epoch, interpolated linearly inside an epoch, the last one afterwards "
                   "(d3LLM Dream: [16, 24, 32] over 3 epochs). One value with data.streaming (no epochs).")
    blockwise: bool = cfg_field(True, help="Score one random response block per document, earlier response clean "
                                           "and later response masked (d3LLM's use_blockwise_loss); false = the "
                                           "whole response is the block.")
    complementary: bool = cfg_field(True, help="Also score the block with its mask inverted (a second copy of each "
                                               "row in the same forward: 2x the activations).")
    random_mask: bool = cfg_field(False, help="d3LLM's naive baseline: mask the block at random with the same "
                                              "curriculum instead of by the teacher's order (no trajectories).")
    entropy_weight: float = cfg_field(
        0.0, help="Weight of the certainty term: the entropy of softmax(logits / entropy_temperature) at scored "
                  "tokens the model predicts correctly, summed and divided by the scored-token count like the CE "
                  "(d3LLM: 1.0 with a per-batch mean over the correct tokens; docs/recipes.md). 0 = off.")
    entropy_temperature: float = cfg_field(0.5, help="Softmax temperature of the certainty term (d3LLM: 0.5).")

    def __post_init__(self) -> None:
        _between("train.d3llm.min_mask_ratio", self.min_mask_ratio, 0.0, 1.0)
        _between("train.d3llm.max_mask_ratio", self.max_mask_ratio, 0.0, 1.0)
        _check(self.min_mask_ratio <= self.max_mask_ratio,
               f"train.d3llm.min_mask_ratio={self.min_mask_ratio} exceeds max_mask_ratio={self.max_mask_ratio}")
        _check(len(self.block_sizes) > 0 and all(b >= 1 for b in self.block_sizes),
               f"train.d3llm.block_sizes must be a non-empty list of ints >= 1, got {self.block_sizes}")
        _at_least("train.d3llm.entropy_weight", self.entropy_weight, 0.0)
        _between("train.d3llm.entropy_temperature", self.entropy_temperature, 0.0, float("inf"), low_open=True)


@dataclass
class TrainArgs:
    output_dir: str = cfg_field("outputs/run", help="Checkpoints, logs and resolved_config.yaml go here.")
    max_steps: Optional[int] = cfg_field(None, help="Optimizer steps to run; none = num_train_epochs "
                                                    "over the data.")
    num_train_epochs: int = cfg_field(1, help="Epochs when max_steps is none.")
    save_steps: int = cfg_field(0, help="Checkpoint every N steps; 0 = only at the end.")
    save_total_limit: int = cfg_field(3, help="Keep at most this many checkpoints; 0 = keep all.")
    seed: int = cfg_field(42, help="Seed for model init, data order and noise.")
    micro_batch_size: int = cfg_field(1, help="Sequences per forward pass on one data-parallel rank.")
    global_batch_size: Optional[int] = cfg_field(
        None, help="Sequences per optimizer step over all ranks; none = micro_batch_size * dp_size. "
                   "Gradient accumulation = global / (micro * dp) (see resolve_batch).")
    lr: float = cfg_field(1e-4, help="Peak learning rate.")
    min_lr_ratio: float = cfg_field(0.0, help="Final learning rate as a fraction of lr.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = cfg_field(
        "cosine", help="Decay after warmup, down to lr * min_lr_ratio.")
    warmup_steps: int = cfg_field(0, help="Linear warmup steps from 0 to lr.")
    weight_decay: float = cfg_field(0.0, help="AdamW weight decay.")
    weight_decay_exempt: list[str] = cfg_field(
        ["bias", "norm"], help="Regexes (re.search) on parameter names that get no weight decay; the "
                               "default exempts biases and norms, as HF Trainer does. Add embed_tokens "
                               "to exempt the embeddings (and the mask-token row); [] decays everything.")
    betas: list[float] = cfg_field([0.9, 0.95], help="AdamW (beta1, beta2).")
    max_grad_norm: float = cfg_field(1.0, help="Clip the global gradient norm to this; 0 = no clipping.")
    max_consecutive_skips: int = cfg_field(
        5, help="A step with a non-finite loss or gradient norm is skipped (no update; logged and counted "
                "as skipped_steps in metrics.jsonl); the run stops after this many in a row.")
    objective: Literal["mdm", "bd3lm", "ar", "d3llm", "editflow"] = cfg_field(
        "mdm", help="mdm: masked-diffusion loss; bd3lm: block diffusion, rows fed as [x_t ; x_0] so every "
                    "noisy block is denoised from clean earlier blocks (needs model.attn_mode=block_causal and "
                    "model.block_size); d3llm: SFT responses masked by a teacher's decoding order "
                    "(train.d3llm, data.trajectory_path; loss_weighting/normalization/noise_* are for mdm and "
                    "bd3lm); ar: next-token loss (needs model.attn_mode=causal); editflow: insert / delete / "
                    "substitute edits (train.editflow, data.packing=false). docs/recipes.md.")
    repr_align_weight: float = cfg_field(
        0.0, help="Repr-Align (Open-dLLM): weight of 1 - cosine between the student's hidden states and the "
                  "frozen AR model's (causal, clean input) at the rows whose next token is masked; 0 = off, "
                  "the paper uses 10 (docs/recipes.md).")
    align_layers: list[int] = cfg_field(
        [], help="Repr-Align: hidden states to align, HF's numbering (0 = embedding output, L = final normed "
                 "output, negatives from the end); [] = all L + 1.")
    align_token_fraction: float = cfg_field(
        1.0, help="Repr-Align: align a random fraction of the eligible rows of each micro-batch.")
    align_layer_fraction: float = cfg_field(
        1.0, help="Repr-Align: align a random fraction of align_layers per micro-batch.")
    align_teacher_path: Optional[str] = cfg_field(
        None, help="Repr-Align: the frozen teacher; none = model.model_path (the AR model training starts from).")
    align_cache_dir: Optional[str] = cfg_field(
        None, help="Repr-Align: read the teacher's hidden states from an anchor cache built by "
                   "scripts/precompute_anchors.py instead of running the teacher every step.")
    bd3lm_t_per_block: bool = cfg_field(
        True, help="bd3lm: draw the noise level t per block (BD3-LM, Fast-dLLM v2); false = per document.")
    bd3lm_complementary: bool = cfg_field(
        False, help="bd3lm: also train each row with the complementary mask (the eligible tokens the first "
                    "copy left clean are masked), as Fast-dLLM v2 does; doubles the rows per micro-batch.")
    loss_weighting: Literal["inv_t", "none"] = cfg_field(
        "inv_t", help="Per-token weight of the MDM loss: inv_t = 1/t (the ELBO), none = 1.")
    loss_normalization: Literal["masked", "maskable"] = cfg_field(
        "maskable", help="Divide the summed loss by the global count of masked tokens, or of maskable "
                         "tokens (all tokens that could be masked).")
    logit_shift: bool = cfg_field(True, help="Predict token i from position i-1 (Dream/AR-initialised "
                                             "models); false = predict at position i (LLaDA).")
    noise_eps: float = cfg_field(1e-3, help="Noise level t is drawn from U(noise_eps, 1).")
    noise_per_document: bool = cfg_field(True, help="Draw t per packed document instead of per sequence.")
    mixed_precision: Literal["fp32", "bf16"] = cfg_field(
        "fp32", help="Compute dtype; bf16 keeps fp32 master weights.")
    data_parallel: Literal["fsdp2", "ddp", "none", "deepspeed"] = cfg_field(
        "fsdp2", help="How parameters are replicated/sharded over ranks; deepspeed = DeepSpeed ZeRO "
                      "(needs train.zero_stage and the deepspeed extra; docs/parallelism.md).")
    freeze: list[str] = cfg_field([], help="Regexes (re.search) on parameter names to freeze, e.g. "
                                           "[embed_tokens] or embed,lm_head.")
    log_steps: int = cfg_field(1, help="Log metrics every N steps.")
    eval_steps: int = cfg_field(0, help="Evaluate every N steps; 0 = never during training.")
    use_wandb: bool = cfg_field(False, help="Also log to Weights & Biases (needs the wandb extra).")
    wandb_project: Optional[str] = cfg_field(None, help="W&B project name.")
    resume: bool = cfg_field(True, help="Resume from the newest valid checkpoint in output_dir if there "
                                        "is one (re-running the same command continues the run).")
    export_hf: bool = cfg_field(True, help="Write an HF model directory to <output_dir>/hf at the end.")
    peak_flops: Optional[float] = cfg_field(None, help="Device peak FLOP/s for MFU; none = exact GPU "
                                                       "table, or a matmul measured at start-up on CPU.")
    eval_max_batches: int = cfg_field(0, help="Evaluate on at most this many batches; 0 = all.")
    ce_chunk_size: int = cfg_field(2048, help="Rows of the LM head + cross-entropy computed at once "
                                              "(memory O(chunk x vocab)).")
    progress_bar: bool = cfg_field(True, help="Show a progress bar with tok/s and ETA (main rank).")
    dp_replicate: int = cfg_field(1, help="HSDP: replicate groups (dp_shard = world / dp_replicate).")
    compile: bool = cfg_field(
        False, help="torch.compile each decoder layer (after activation checkpointing, before FSDP2). "
                    "The first steps are slower while it compiles; not with deepspeed, sequence or expert "
                    "parallelism (docs/training.md, torch.compile).")
    expert_parallel_size: int = cfg_field(
        1, help="Expert parallelism: the experts of each MoE layer are split over this many ranks "
                "(tokens travel to their experts by all-to-all); 1 = every rank holds every expert. "
                "Must divide the world size and the number of experts (docs/parallelism.md).")
    ulysses_parallel_size: int = cfg_field(
        1, help="Ulysses sequence parallelism: every row's sequence is split over this many ranks, which "
                "exchange heads for sequence around each token mixer (all-to-all) and also shard the "
                "parameters (FSDP over dp x sp). Needs data_parallel=fsdp2; must divide the world size and "
                "the attention (and gated-DeltaNet) head counts (docs/parallelism.md). 1 = off.")
    zero_stage: Optional[int] = cfg_field(
        None, help="DeepSpeed ZeRO stage for data_parallel=deepspeed: 2 = optimizer state and gradients "
                   "sharded over ranks, 3 = parameters too. Required there, an error otherwise.")
    offload_optimizer: Literal["none", "cpu"] = cfg_field(
        "none", help="data_parallel=deepspeed: keep the optimizer state and fp32 master weights in CPU "
                     "memory and step them there (ZeRO-Offload); none = on the training device.")
    deepspeed_config: Optional[str] = cfg_field(
        None, help="data_parallel=deepspeed: a JSON file of extra DeepSpeed config keys (e.g. bucket "
                   "sizes); keys veomni derives itself (stage, offload, precision, batch, clipping, "
                   "optimizer, scheduler) are refused.")
    router_aux_loss_coef: Optional[float] = cfg_field(
        None, help="MoE: weight of the router load-balancing loss (Switch Transformer's, pooled over "
                   "layers) added to the training loss; none = the model config's router_aux_loss_coef "
                   "(0 when it has none). An error on a dense model.")
    router_z_loss_coef: float = cfg_field(
        0.0, help="MoE: weight of the router z-loss (ST-MoE: mean logsumexp(router logits)^2); 0 = off. "
                  "An error on a dense model when > 0.")
    d3llm: D3LLMArgs = cfg_field(default_factory=D3LLMArgs, help="train.objective=d3llm: curriculum and losses.")
    editflow: EditFlowTrainArgs = cfg_field(default_factory=EditFlowTrainArgs,
                                            help="train.objective=editflow: x0 sampler and kappa schedule.")

    def __post_init__(self) -> None:
        self._check_schedule()
        self._check_optimizer()
        self._check_batch()
        self._check_freeze()
        _between("train.noise_eps", self.noise_eps, 0.0, 1.0, low_open=True, high_open=True)
        _at_least("train.log_steps", self.log_steps, 1)
        _at_least("train.eval_steps", self.eval_steps, 0)
        self._check_moe()
        self._check_deepspeed()
        # Set by resolve_batch once the data-parallel size is known (not config fields).
        self._auto_global_batch = self.global_batch_size is None
        self._grad_accum_steps: Optional[int] = None

    def _check_schedule(self) -> None:
        _at_least("train.max_steps", self.max_steps, 1)
        _at_least("train.num_train_epochs", self.num_train_epochs, 1)
        _at_least("train.save_steps", self.save_steps, 0)
        _at_least("train.save_total_limit", self.save_total_limit, 0)
        _at_least("train.warmup_steps", self.warmup_steps, 0)
        _check(self.max_steps is None or self.warmup_steps <= self.max_steps,
               f"train.warmup_steps={self.warmup_steps} exceeds train.max_steps={self.max_steps}")

    def _check_optimizer(self) -> None:
        _at_least("train.lr", self.lr, 0.0)
        _between("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _at_least("train.weight_decay", self.weight_decay, 0.0)
        _at_least("train.max_grad_norm", self.max_grad_norm, 0.0)
        _check(len(self.betas) == 2, f"train.betas needs 2 values (beta1, beta2), got {self.betas}")
        for i, beta in enumerate(self.betas):
            _between(f"train.betas[{i}]", beta, 0.0, 1.0, high_open=True)

    def _check_batch(self) -> None:
        _at_least("train.micro_batch_size", self.micro_batch_size, 1)
        _at_least("train.global_batch_size", self.global_batch_size, 1)

    def _check_freeze(self) -> None:
        for key in ("freeze", "weight_decay_exempt"):
            for pattern in getattr(self, key):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"train.{key} pattern {pattern!r} is not a valid regex: {exc}") from None
        _at_least("train.max_consecutive_skips", self.max_consecutive_skips, 1)

    def _check_moe(self) -> None:
        _at_least("train.expert_parallel_size", self.expert_parallel_size, 1)
        _at_least("train.ulysses_parallel_size", self.ulysses_parallel_size, 1)
        _at_least("train.repr_align_weight", self.repr_align_weight, 0.0)
        _between("train.align_token_fraction", self.align_token_fraction, 0.0, 1.0, low_open=True)
        _between("train.align_layer_fraction", self.align_layer_fraction, 0.0, 1.0, low_open=True)
        _at_least("train.router_aux_loss_coef", self.router_aux_loss_coef, 0.0)
        _at_least("train.router_z_loss_coef", self.router_z_loss_coef, 0.0)

    def _check_deepspeed(self) -> None:
        if self.data_parallel != "deepspeed":
            for key, value, unset in (("zero_stage", self.zero_stage, None),
                                      ("offload_optimizer", self.offload_optimizer, "none"),
                                      ("deepspeed_config", self.deepspeed_config, None)):
                _check(value == unset, f"train.{key}={value!r} is a DeepSpeed setting but train.data_parallel="
                                       f"{self.data_parallel!r}; set train.data_parallel=deepspeed or remove it")
            return
        _check(self.zero_stage in (2, 3),
               f"train.data_parallel=deepspeed needs train.zero_stage=2 (optimizer state and gradients "
               f"sharded) or 3 (parameters too), got {self.zero_stage!r}")
        _check(self.expert_parallel_size == 1,
               f"train.expert_parallel_size={self.expert_parallel_size} does not compose with "
               "train.data_parallel=deepspeed (experts are FSDP2-sharded); use data_parallel=fsdp2")
        _check(self.dp_replicate == 1,
               f"train.dp_replicate={self.dp_replicate} is an FSDP2 (HSDP) setting; DeepSpeed ZeRO shards "
               "over all ranks: use dp_replicate=1")
        _check(self.ulysses_parallel_size == 1,
               f"train.ulysses_parallel_size={self.ulysses_parallel_size} does not compose with "
               "train.data_parallel=deepspeed (the sp ranks shard parameters through FSDP2); use data_parallel=fsdp2")

    def resolve_batch(self, dp_size: int) -> int:
        """Fix the batch geometry for ``dp_size`` data-parallel ranks; return grad_accum_steps.

        Fills ``global_batch_size`` (micro * dp when it was left unset) and sets
        ``grad_accum_steps = global_batch_size / (micro_batch_size * dp_size)``.
        """
        _check(isinstance(dp_size, int) and dp_size >= 1, f"dp_size must be an int >= 1, got {dp_size!r}")
        per_step = self.micro_batch_size * dp_size
        if self._auto_global_batch:
            self.global_batch_size = per_step
        if self.global_batch_size % per_step:
            low = max(per_step, self.global_batch_size // per_step * per_step)
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size * dp_size = {self.micro_batch_size} * {dp_size} = {per_step}; "
                f"use a multiple of {per_step} (e.g. {low} or {low + per_step}) or change micro_batch_size")
        self._grad_accum_steps = self.global_batch_size // per_step
        return self._grad_accum_steps

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step on each rank; set by ``resolve_batch``."""
        _check(self._grad_accum_steps is not None,
               "train.grad_accum_steps is not known yet: call args.train.resolve_batch(dp_size) first")
        return self._grad_accum_steps


# ----------------------------------------------------------------------------- inference
@dataclass
class InferArgs:
    max_new_tokens: int = cfg_field(128, help="Tokens to generate after the prompt.")
    steps: Optional[int] = cfg_field(None, help="Denoising steps; none = max_new_tokens.")
    alg: SamplerAlg = cfg_field("maskgit_plus", help="Which positions to reveal each step (Dream algs, "
                                                     "p2, LLaDA low_confidence/random, low_entropy, Fast-dLLM "
                                                     "threshold/factor, d3LLM multi_block).")
    temperature: float = cfg_field(0.0, help="Sampling temperature; 0 = greedy.")
    top_p: Optional[float] = cfg_field(None, help="Nucleus sampling mass; none = off.")
    top_k: Optional[int] = cfg_field(None, help="Keep only the k most likely tokens; none = off.")
    eps: float = cfg_field(1e-3, help="Final noise level of the time grid linspace(1, eps, steps+1).")
    alg_temp: Optional[float] = cfg_field(None, help="Sample positions from softmax(confidence/alg_temp) "
                                                     "instead of taking the top ones; none = top.")
    block_length: Optional[int] = cfg_field(None, help="Semi-autoregressive block length; none = one "
                                                       "block of max_new_tokens.")
    threshold: Optional[float] = cfg_field(None, help="Confidence threshold for alg=threshold (required "
                                                      "there) or the entropy threshold of multi_block.")
    factor: Optional[float] = cfg_field(None, help="Parallel-decoding factor for alg=factor (required there).")
    factor_strict: bool = cfg_field(
        False, help="alg=factor: commit only the candidates that pass c_n >= 1 - f/(n+1); false = "
                    "Fast-dLLM's count, which also commits the last candidate when it is the only one failing.")
    cfg_scale: float = cfg_field(0.0, help="Classifier-free guidance scale; 0 = off.")
    use_cache: Literal["none", "prefix", "dual", "block"] = cfg_field(
        "none", help="KV cache: none, prefix (Fast-dLLM), dual (prefix + suffix), block.")
    seed: int = cfg_field(0, help="Seed for sampling.")
    exact_step_counts: bool = cfg_field(
        False, help="Dream algs / LLaDA: spread the tokens exactly over the steps instead of Dream's "
                    "floored int(#mask * (1 - s/t)) per step.")
    block_add_threshold: Optional[float] = cfg_field(
        None, help="alg=multi_block: append a new block once the last one is this fraction decoded; "
                   "none = 0.1.")
    decoded_token_threshold: Optional[float] = cfg_field(
        None, help="alg=multi_block: a block is fully active once its predecessor is this fraction "
                   "decoded; none = 0.95.")
    editflow: EditFlowInferArgs = cfg_field(default_factory=EditFlowInferArgs,
                                            help="alg=editflow: tau-leaping settings.")
    stop_strings: list[str] = cfg_field(
        [], help="Cut each completion before the first of these strings (after EOS trimming). A string "
                 "with a comma needs the YAML form: --infer.stop_strings='[\"a,b\"]'.")
    compile: bool = cfg_field(
        False, help="torch.compile the model forward for decoding: CUDA graphs (mode reduce-overhead) on "
                    "GPU, inductor on CPU. The first forwards compile (slow); pays off on long or repeated "
                    "generations (docs/inference.md, compiled decoding).")

    def __post_init__(self) -> None:
        self._derive_steps()
        self._check_ranges()
        self._check_alg_needs()

    def _derive_steps(self) -> None:
        if self.steps is None:
            self.steps = self.max_new_tokens

    def _check_ranges(self) -> None:
        _at_least("infer.max_new_tokens", self.max_new_tokens, 1)
        _at_least("infer.steps", self.steps, 1)
        _at_least("infer.temperature", self.temperature, 0.0)
        _between("infer.top_p", self.top_p, 0.0, 1.0, low_open=True)
        _at_least("infer.top_k", self.top_k, 1)
        _between("infer.eps", self.eps, 0.0, 1.0, low_open=True, high_open=True)
        _at_least("infer.alg_temp", self.alg_temp, 0.0)
        _at_least("infer.block_length", self.block_length, 1)
        if self.alg == "multi_block":  # an entropy bound, not a probability
            _at_least("infer.threshold", self.threshold, 0.0)
        else:
            _between("infer.threshold", self.threshold, 0.0, 1.0, low_open=True)
        _between("infer.factor", self.factor, 0.0, float("inf"), low_open=True)
        _at_least("infer.cfg_scale", self.cfg_scale, 0.0)
        _between("infer.block_add_threshold", self.block_add_threshold, 0.0, 1.0)
        _between("infer.decoded_token_threshold", self.decoded_token_threshold, 0.0, 1.0)
        _check(all(self.stop_strings), "infer.stop_strings must not contain an empty string")

    def _check_alg_needs(self) -> None:
        for alg, name in (("threshold", "threshold"), ("factor", "factor")):
            _check(self.alg != alg or getattr(self, name) is not None,
                   f"infer.alg='{alg}' needs infer.{name} (e.g. --infer.{name}=0.9)")


# ----------------------------------------------------------------------------- root
@dataclass
class Arguments:
    model: ModelArgs = cfg_field(default_factory=ModelArgs, help="Model and attention.")
    data: DataArgs = cfg_field(default_factory=DataArgs, help="Training/eval data.")
    train: TrainArgs = cfg_field(default_factory=TrainArgs, help="Optimisation and the MDM objective.")
    infer: InferArgs = cfg_field(default_factory=InferArgs, help="Sampling.")

    def __post_init__(self) -> None:
        self._check_objective_vs_attention()
        self._check_d3llm()
        check_editflow(self)  # veomni/diffusion/editflow/args.py
        self._check_lora_composition()

    def _check_lora_composition(self) -> None:
        m, t = self.model, self.train
        if not m.lora_rank:
            return
        refused = (
            (t.data_parallel == "deepspeed", "train.data_parallel=deepspeed (use none, ddp or fsdp2)"),
            (t.expert_parallel_size > 1, f"train.expert_parallel_size={t.expert_parallel_size}"),
            (t.ulysses_parallel_size > 1, f"train.ulysses_parallel_size={t.ulysses_parallel_size}"),
            (t.data_parallel == "fsdp2" and m.meta_init,
             "model.meta_init=true: adapters are built on loaded weights; with LoRA every rank loads the whole "
             "model, so set model.meta_init=false"),
            (m.init_from_scratch, "model.init_from_scratch=true: adapters on random weights train nothing useful"),
            (bool(t.freeze), f"train.freeze={t.freeze}: with LoRA only the adapters train; use model.lora_trainable "
                             "for base parameters that should train too"),
        )
        for bad, what in refused:
            _check(not bad, f"model.lora_rank={m.lora_rank} (LoRA) does not compose with {what}")

    def _check_objective_vs_attention(self) -> None:
        # An AR loss under bidirectional attention lets each position see the token it predicts:
        # the loss collapses to ~0 and the model learns nothing usable.
        _check(self.train.objective != "ar" or self.model.attn_mode == "causal",
               f"train.objective='ar' needs model.attn_mode='causal' (got '{self.model.attn_mode}')")
        # MDM under causal attention would train an AR model with holes in its left context, which
        # no diffusion sampler can decode (it reveals positions in any order): refused, not guessed.
        _check(self.train.objective != "mdm" or self.model.attn_mode != "causal",
               "train.objective='mdm' needs model.attn_mode='bidirectional' or 'block_causal' (got 'causal'); "
               "use train.objective='ar' to train a causal model")
        t = self.train
        _check(t.objective != "bd3lm" or (self.model.attn_mode == "block_causal" and self.model.block_size),
               f"train.objective='bd3lm' needs model.attn_mode='block_causal' and model.block_size (got "
               f"'{self.model.attn_mode}', block_size {self.model.block_size})")
        _check(t.objective == "bd3lm" or (t.bd3lm_t_per_block and not t.bd3lm_complementary),
               f"train.bd3lm_t_per_block / train.bd3lm_complementary only apply to train.objective='bd3lm' "
               f"(objective is '{t.objective}')")

    def _check_d3llm(self) -> None:
        objective, data = self.train.objective, self.data
        if objective != "d3llm":
            _check(data.trajectory_path is None,
                   f"data.trajectory_path is read by train.objective=d3llm only (objective is '{objective}')")
            _check(self.train.d3llm == D3LLMArgs(),
                   f"train.d3llm.* settings apply to train.objective=d3llm only (objective is '{objective}')")
            return
        _check(data.data_type == "sft", "train.objective=d3llm masks SFT responses: set data.data_type=sft")
        _check(self.model.attn_mode == "bidirectional",
               f"train.objective=d3llm trains a bidirectional model; set model.attn_mode=bidirectional "
               f"(got '{self.model.attn_mode}')")
        _check(bool(data.trajectory_path) or self.train.d3llm.random_mask,
               "train.objective=d3llm needs data.trajectory_path (write it with scripts/precompute_trajectories.py), "
               "or train.d3llm.random_mask=true for the random-mask baseline")
        _check(not (data.trajectory_path and self.train.d3llm.random_mask),
               "train.d3llm.random_mask=true masks at random and reads no data.trajectory_path; drop one of them")
        _check(not (data.trajectory_path and data.pad_response_with_eos),
               "data.pad_response_with_eos=true adds an EOS tail to every response, and the trajectories in "
               "data.trajectory_path record a decoding order for the response tokens only; drop "
               "pad_response_with_eos (or use train.d3llm.random_mask=true, which masks the tail at random)")
        _check(not (data.streaming and len(self.train.d3llm.block_sizes) > 1),
               f"train.d3llm.block_sizes={self.train.d3llm.block_sizes} changes per epoch, but data.streaming has "
               "no epochs: give one block size")
