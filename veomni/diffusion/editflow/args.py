"""Config groups of EditFlow: ``train.editflow.*`` and ``infer.editflow.*`` (nested in veomni/config/schema.py)
and the cross-group checks of ``train.objective=editflow``."""
from dataclasses import dataclass
from typing import Literal

from veomni.config.parser import ConfigError, cfg_field

KappaName = Literal["cubic", "linear", "cosine"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class EditFlowTrainArgs:
    """train.objective=editflow (veomni/diffusion/editflow/objective.py; docs/recipes.md, "EditFlow")."""

    x0_sampler: str = cfg_field("masks:64", help="Source x0 after the frozen BOS/prompt: masks:N (N mask tokens; "
                                                 "dllm uses 64 or 128) or empty (generation by insertion only).")
    schedule: KappaName = cfg_field("cubic", help="kappa(t): cubic = 2t^3 - 3t^2 + 2t (Edit Flows / dllm), linear = "
                                                  "t, cosine = 1 - cos(pi t / 2).")
    max_w: float = cfg_field(20.0, help="Clamp of the loss weight w = kappa'(t) / (1 - kappa(t)) (dllm: 20).")
    time_eps: float = cfg_field(1e-3, help="t is drawn from U[0, 1 - time_eps).")

    def __post_init__(self) -> None:
        from veomni.diffusion.editflow.flow import X0Sampler

        try:
            X0Sampler(self.x0_sampler, 0)
        except ValueError as exc:
            raise ConfigError(f"train.editflow.x0_sampler: {exc}") from None
        _check(self.max_w > 0, f"train.editflow.max_w must be > 0, got {self.max_w}")
        _check(0 < self.time_eps < 1, f"train.editflow.time_eps must be in (0, 1), got {self.time_eps}")


@dataclass
class EditFlowInferArgs:
    """infer.alg=editflow: tau-leaping (veomni/diffusion/editflow/sampler.py; docs/inference.md)."""

    tau: float = cfg_field(0.01, help="Time step of the tau-leap; ceil(1 / tau) steps (dllm: 0.01).")
    init_masks: int = cfg_field(64, help="Mask tokens appended to the prompt as x0 (match train.editflow.x0_sampler; "
                                         "0 = start from the prompt alone).")
    schedule: KappaName = cfg_field("linear", help="kappa of the sampler's w(t) = kappa' / (1 - kappa); dllm samples "
                                                   "with linear (w = 1 / (1 - t)) whatever the training schedule.")
    max_w: float = cfg_field(20.0, help="Clamp of w(t) near t = 1.")
    max_length: int = cfg_field(512, help="Cap on prompt + generated tokens: insertions that would pass it are not "
                                          "made in that step.")
    time_eps: float = cfg_field(1e-3, help="Stop once t >= 1 - time_eps.")

    def __post_init__(self) -> None:
        _check(0 < self.tau <= 1, f"infer.editflow.tau must be in (0, 1], got {self.tau}")
        _check(self.init_masks >= 0, f"infer.editflow.init_masks must be >= 0, got {self.init_masks}")
        _check(self.max_w > 0, f"infer.editflow.max_w must be > 0, got {self.max_w}")
        _check(self.max_length >= 2, f"infer.editflow.max_length must be >= 2, got {self.max_length}")
        _check(0 < self.time_eps < 1, f"infer.editflow.time_eps must be in (0, 1), got {self.time_eps}")


def check_editflow(args) -> None:
    """Arguments-level checks: what train.objective=editflow needs and what it does not compose with."""
    t, m, d = args.train, args.model, args.data
    if t.objective != "editflow":
        _check(t.editflow == EditFlowTrainArgs(),
               f"train.editflow.* settings apply to train.objective=editflow only (objective is '{t.objective}')")
        return
    _check(m.attn_mode == "bidirectional", f"train.objective=editflow trains a bidirectional model; set "
                                           f"model.attn_mode=bidirectional (got '{m.attn_mode}')")
    _check(not d.packing, "train.objective=editflow aligns one document per row: set data.packing=false "
                          "(rows are padded to the longest x_t of the micro-batch)")
    refused = (
        (t.ulysses_parallel_size > 1, f"train.ulysses_parallel_size={t.ulysses_parallel_size} (the model input x_t "
                                      "is built per row after the corruption; use data parallelism)"),
        (t.data_parallel == "fsdp2" and m.meta_init, "model.meta_init=true under fsdp2 (the heads are built from the "
                                                     "loaded LM head): set model.meta_init=false"),
        (bool(m.lora_rank), f"model.lora_rank={m.lora_rank} (the new heads must train in full)"),
        (t.expert_parallel_size > 1, f"train.expert_parallel_size={t.expert_parallel_size}"),
        # ZeRO-3 would also need the sub / ins head weights registered as external parameters (the fused
        # loss reads them inside the root forward); no equivalence test covers DeepSpeed with EditFlow yet.
        (t.data_parallel == "deepspeed", "train.data_parallel=deepspeed (use ddp or fsdp2, both tested)"),
    )
    for bad, what in refused:
        _check(not bad, f"train.objective=editflow does not compose with {what}")

