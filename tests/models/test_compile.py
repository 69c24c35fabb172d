"""train.compile: the compiled decoder layers equal eager, and the layers have no graph breaks.

Tolerance of the parity tests (fp32): inductor fuses the norms and the softmax and so sums in
another order; on a 2-layer model the logits and gradients differ from eager by ~1e-6, well under
atol 1e-5 / rtol 1e-4. A wrong mask or a dropped residual changes them by > 1e-2.
"""
import copy

import pytest
import torch

from tests.models.tiny import VOCAB, build_moe_pair, build_pair
from veomni.models.compile import compile_decoder_layers, decoder_blocks, layer_graph_breaks

MODES = {"bidirectional": None, "block_causal": 4}


def _batch(slen=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, slen), generator=g)
    mask = torch.ones(2, slen, dtype=torch.long)
    mask[1, :3] = 0  # left padding: the mask path, not the no-mask fast path
    return ids, mask


def _fwd_bwd(model, ids, mask, mode):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, attn_mode=mode, block_size=MODES[mode])
    # A loss that weighs every logit differently, so each gradient entry is checked.
    w = torch.linspace(-1, 1, out.logits.numel()).reshape(out.logits.shape)
    (out.logits * w).sum().backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# Two cases, not four: each compiles a forward and a backward graph (~15-30 s on 2 CPU cores).
@pytest.mark.parametrize("mode,checkpointing", [("bidirectional", False), ("block_causal", True)],
                         ids=["bidirectional-plain", "block_causal-checkpointed"])
def test_compiled_layers_equal_eager(mode, checkpointing):
    from torch._dynamo.utils import counters

    from veomni.distributed.parallelism import apply_activation_checkpointing

    torch._dynamo.reset()
    counters.clear()
    eager = build_pair("qwen3")[1].train()
    compiled = copy.deepcopy(eager)
    if checkpointing:  # the order parallelize uses: checkpoint wrapper first, compile around it
        apply_activation_checkpointing(compiled)
    assert compile_decoder_layers(compiled) == len(decoder_blocks(compiled))
    ids, mask = _batch()
    ref_logits, ref_grads = _fwd_bwd(eager, ids, mask, mode)
    logits, grads = _fwd_bwd(compiled, ids, mask, mode)
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    names = {n.replace("._checkpoint_wrapped_module", "") for n in grads}
    assert names == set(ref_grads)  # names unchanged by compile: checkpoints keep their keys
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name.replace("._checkpoint_wrapped_module", "")],
                                   atol=1e-5, rtol=1e-4, msg=name)
    assert set(compiled.state_dict()) == set(eager.state_dict())


def test_compile_is_idempotent():
    model = build_pair("llama")[1]
    compile_decoder_layers(model)
    fwd = model.model.layers[0].forward
    compile_decoder_layers(model)
    assert model.model.layers[0].forward is fwd


@pytest.mark.parametrize("mode", ["causal", "bidirectional", "block_causal"])
def test_dense_and_moe_layers_have_no_graph_breaks(mode):
    """A regression guard: a .item(), a bool(tensor) or a data-dependent shape in the layer (or in
    the attention / MoE code it calls) shows up here as a graph break."""
    ids, mask = _batch()
    kw = dict(attn_mode=mode, block_size=4 if mode == "block_causal" else None)
    for model in (build_pair("qwen3")[1].train(), build_moe_pair("qwen3_moe")[1].train()):
        for attention_mask in (None, mask):
            breaks = layer_graph_breaks(model, input_ids=ids, attention_mask=attention_mask, **kw)
            assert breaks and all(not b for b in breaks.values()), breaks


def test_compile_refuses_deepspeed():
    from veomni.distributed.parallelism import ParallelizeConfig

    with pytest.raises(ValueError, match="train.compile=true is not supported with train.data_parallel=deepspeed"):
        ParallelizeConfig(dp_mode="deepspeed", compile=True)
