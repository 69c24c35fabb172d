"""The op switch: `model.ops` maps an op name to the implementation the model runs.

    model:
      ops: {moe_experts: loop}          # YAML
    --model.ops.moe_experts=loop        # command line (one op; the others keep theirs)

`OPS` lists every known op with its choices and default. The config resolves a mapping against it
when it is built (`resolve_ops`: an unknown op or choice is an error naming the valid ones, a
missing op gets its default), so resolved_config.yaml always names the implementation of every op.
`apply_ops(model, ops)` installs the choices on a built model; the trainer calls it before
parallelism wraps the model and logs what it chose.

Adding an op (rms_norm, rope, swiglu, linear_ce, ...): one `OpSpec` below, whose `install`
sets the choice on the modules that use the op and returns how many there are.

No torch import at module level: the config schema imports this module, and parsing a config must
stay cheap.
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

logger = logging.getLogger("veomni")


@dataclass(frozen=True)
class OpSpec:
    choices: Tuple[str, ...]
    default: str
    about: Dict[str, str]  # choice -> one line, for --help and error messages
    install: Callable[[Any, str], int]  # (model, choice) -> number of modules that use the op


def _install_moe_experts(model, choice: str) -> int:
    from veomni.models.transformers.moe import Experts

    n = 0
    for m in model.modules():
        if isinstance(m, Experts):
            # An instance attribute, not the class one: two models in one process (a test, a
            # teacher) keep their own choice. It survives fully_shard / expert parallelism, which
            # keep the module object.
            m.impl = choice
            n += 1
    return n


def _require_fla() -> None:
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"model.ops.gdn=fla needs flash-linear-attention ({exc}): pip install "
                         "flash-linear-attention (CUDA GPU), or set --model.ops.gdn=torch") from None


def require_triton(what: str) -> None:
    """Raise a ValueError naming the fix when Triton kernels cannot run here: triton missing, or
    no CUDA GPU and not TRITON_INTERPRET=1 (the interpreter runs kernels on CPU tensors, slowly:
    what the parity tests use). Called when the choice is installed, not at the first forward."""
    import os

    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"{what} needs triton ({exc}): pip install -e '.[kernels]', or choose 'eager'") from None
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{what} runs Triton kernels, which need a CUDA GPU; on CPU set TRITON_INTERPRET=1 "
                         "(the slow interpreter, for tests) or choose 'eager'")


def require_liger(what: str) -> None:
    """As require_triton, for liger-kernel (whose ops are Triton kernels too)."""
    try:
        import liger_kernel  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"{what} needs liger-kernel ({exc}): pip install -e '.[kernels]', or choose 'eager'") from None
    require_triton(what)


def _install_gdn(model, choice: str) -> int:
    from veomni.models.transformers.gated_deltanet import GatedDeltaNet

    n = 0
    for m in model.modules():
        if isinstance(m, GatedDeltaNet):
            if choice == "fla":
                _require_fla()  # at start-up, not at the first forward
            m.impl = choice
            n += 1
    return n


def _require_kernel_choice(op: str, choice: str) -> None:
    """The shared availability check of the eager | triton | liger ops, at install."""
    if choice == "triton":
        require_triton(f"model.ops.{op}=triton")
    elif choice == "liger":
        require_liger(f"model.ops.{op}=liger")


def _install_rms_norm(model, choice: str) -> int:
    from veomni.models.transformers.dense_decoder import RMSNorm
    from veomni.models.transformers.gated_deltanet import GatedRMSNorm
    from veomni.models.transformers.qwen3_5.modeling_qwen3_5 import ZeroCenteredRMSNorm

    # GDN's GatedRMSNorm (norm * silu(gate)) runs the choice's RMSNorm then its SwiGLU kernel.
    norms = [m for m in model.modules() if isinstance(m, (RMSNorm, ZeroCenteredRMSNorm, GatedRMSNorm))]
    if norms:
        _require_kernel_choice("rms_norm", choice)
    for m in norms:
        m.impl = choice
    return len(norms)


def _install_rope(model, choice: str) -> int:
    from veomni.models.transformers.dense_decoder import Attention, RotaryEmbedding

    attns = [m for m in model.modules() if isinstance(m, Attention)]
    if attns:
        _require_kernel_choice("rope", choice)
    if choice == "liger":
        rotary = {2 * m.inv_freq.numel() for m in model.modules() if isinstance(m, RotaryEmbedding)}
        partial = sorted({(r, a.head_dim) for r in rotary for a in attns if r != a.head_dim})
        if partial:
            r, d = partial[0]
            raise ValueError(f"model.ops.rope=liger rotates whole heads, and this model rotates {r} of its "
                             f"{d} head dims (partial rotary); use model.ops.rope=triton (partial rotary "
                             "supported) or eager")
    for m in attns:
        m.rope_impl = choice
    return len(attns)


def _install_swiglu(model, choice: str) -> int:
    import torch.nn.functional as F

    from veomni.models.transformers.dense_decoder import MLP
    from veomni.models.transformers.moe import Experts

    # The dense MLPs (and Qwen2-MoE / Qwen3.5-MoE shared experts, which are MLPs), and the routed
    # experts, whose SwiGLU sits between the two grouped matmuls of veomni/ops/moe_experts.py.
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    if (mlps or experts) and choice != "eager":
        other = sorted({m.hidden_act for m in mlps if m.hidden_act != "silu"})
        if other or any(m.act is not F.silu for m in experts):
            act = repr(other[0]) if other else "not silu (routed experts)"
            raise ValueError(f"model.ops.swiglu={choice} fuses silu(gate) * up, and this model's MLP activation "
                             f"is hidden_act={act}; use model.ops.swiglu=eager")
        _require_kernel_choice("swiglu", choice)
    for m in mlps:
        m.impl = choice
    for m in experts:
        m.act_impl = choice
    return len(mlps) + len(experts)


_KERNEL_ABOUT = {
    "eager": "plain torch, the reference (HF's op order)",
    "triton": "our Triton kernel, forward + backward, fp32 math (CUDA GPU, or TRITON_INTERPRET=1 on CPU; "
              "pip install -e '.[kernels]')",
    "liger": "liger-kernel's kernel (pip install -e '.[kernels]'; CUDA GPU)",
}

def _install_linear_ce(model, choice: str) -> int:
    from veomni.models.transformers.dense_decoder import DecoderForCausalLM

    n = 0
    for m in model.modules():
        if isinstance(m, DecoderForCausalLM):
            if n == 0 and choice in ("triton", "liger"):
                (require_triton if choice == "triton" else require_liger)(f"model.ops.linear_ce={choice}")
            # The model's forward makes this choice current around its loss_fn call
            # (veomni.ops.linear_ce.use_linear_ce), so every objective's head + CE follows it.
            m.linear_ce_impl = choice
            n += 1
    return n


OPS: Dict[str, OpSpec] = {
    # Choices must equal veomni.ops.moe_experts.EXPERT_IMPLS (tests/ops/test_ops_registry.py);
    # listed here so that the config does not import torch.
    "moe_experts": OpSpec(
        choices=("grouped", "loop"), default="grouped",
        about={"grouped": "tokens sorted by expert once, two grouped matmuls for all experts",
               "loop": "the reference, transformers' loop: gather, SwiGLU and scatter-add per expert"},
        install=_install_moe_experts),
    # Choices must equal veomni.ops.gdn.GDN_IMPLS.
    "gdn": OpSpec(
        choices=("torch", "fla"), default="torch",
        about={"torch": "our chunked delta rule (UT/WY form, fp32) and conv in plain torch, document-exact "
                        "under packing; any device",
               "fla": "flash-linear-attention's Triton chunk kernels and causal conv (CUDA; "
                      "pip install flash-linear-attention)"},
        install=_install_gdn),
    # Choices must equal veomni.ops.{rms_norm,rope,swiglu}.*_IMPLS.
    "rms_norm": OpSpec(
        choices=("eager", "triton", "liger"), default="eager",
        about={**_KERNEL_ABOUT, "liger": _KERNEL_ABOUT["liger"] + "; zero-centred norms via its offset=1"},
        install=_install_rms_norm),
    "rope": OpSpec(
        choices=("eager", "triton", "liger"), default="eager",
        about={**_KERNEL_ABOUT, "liger": _KERNEL_ABOUT["liger"] + "; whole-head rotary only"},
        install=_install_rope),
    "swiglu": OpSpec(
        choices=("eager", "triton", "liger"), default="eager",
        about={**_KERNEL_ABOUT, "triton": _KERNEL_ABOUT["triton"] + "; hidden_act=silu only",
               "liger": _KERNEL_ABOUT["liger"] + "; hidden_act=silu only"},
        install=_install_swiglu),
    # Choices must equal veomni.ops.linear_ce.LINEAR_CE_IMPLS.
    "linear_ce": OpSpec(
        choices=("eager", "triton", "liger"), default="eager",
        about={"eager": "LM head + CE on the loss positions only, chunked over rows in plain torch (fp32 logits)",
               "triton": "the same chunked head + CE in our Triton kernels (CUDA; pip install -e '.[kernels]')",
               "liger": "liger-kernel's fused linear CE on the loss positions (CUDA; per-token 1/t weights need "
                        "a liger-kernel with per-row gradients, see veomni/ops/linear_ce.py)"},
        install=_install_linear_ce),
}


def default_ops() -> Dict[str, str]:
    return {name: spec.default for name, spec in OPS.items()}


def ops_help() -> str:
    parts = []
    for name, spec in OPS.items():
        choices = "; ".join(f"{c}: {spec.about[c]}" for c in spec.choices)
        parts.append(f"{name} = {' | '.join(spec.choices)} (default {spec.default}; {choices})")
    return ("Op implementations, op -> choice; unlisted ops keep their default. " + ". ".join(parts)
            + ". One op from the command line: --model.ops.moe_experts=loop.")


def resolve_ops(ops: Optional[Mapping[str, str]], where: str = "model.ops") -> Dict[str, str]:
    """Every known op -> its choice (`ops` over the defaults). Raises ValueError naming the valid
    ops / choices for an unknown op or choice."""
    ops = dict(ops or {})
    for name, choice in ops.items():
        if name not in OPS:
            close = difflib.get_close_matches(str(name), list(OPS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"{where} has no op '{name}'; known ops: {', '.join(OPS)}{hint}")
        spec = OPS[name]
        if choice not in spec.choices:
            listed = ", ".join(f"'{c}' ({spec.about[c]})" for c in spec.choices)
            raise ValueError(f"{where}.{name}={choice!r} is not one of {listed}")
    return {name: ops.get(name, spec.default) for name, spec in OPS.items()}


def apply_ops(model, ops: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """Install the implementations on `model` (before DDP/FSDP/EP wrap it), log them, and return
    the resolved {op: choice} of every known op."""
    resolved = resolve_ops(ops)
    used = {name: OPS[name].install(model, choice) for name, choice in resolved.items()}
    logger.info("ops: %s", ", ".join(
        f"{name}={choice} ({used[name]} modules)" if used[name] else f"{name}={choice} (unused by this model)"
        for name, choice in resolved.items()))
    return resolved
