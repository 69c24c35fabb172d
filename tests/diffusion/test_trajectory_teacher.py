"""The trajectory teacher (veomni.diffusion.trajectory.teacher_orders, sampler alg low_entropy) against a
labelled transcription of d3LLM's teacher loop: hao-ai-lab/d3LLM,
d3llm/d3llm_DREAM/distill_1_data_prepare/d3llm_dream_generate_partly.py, `_sample_with_trajectory`
(alg 'entropy_threshold', threshold -inf, temperature 0) and `sample_tokens_with_entropy`.
Both run a tiny random float64 model whose MASK logit is -inf (our samplers never propose MASK,
d3LLM's argmax could), with one prompt per call (d3LLM decodes batch 1; we batch left-padded rows).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from tests.inference.helpers import MASK, tiny_dllm
from veomni.diffusion.sampling import diffusion_generate
from veomni.diffusion.trajectory import gen_length_for, teacher_orders


class NoMaskModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, **kw):
        out = self.inner(input_ids, **kw)
        out.logits[..., MASK] = -math.inf
        return out


# ---- d3LLM (transcription) ----------------------------------------------------------------------
def d3llm_sample_tokens_with_entropy(logits, temperature=0.0):
    original_probs = torch.softmax(logits, dim=-1)
    log_probs = torch.log(original_probs + 1e-8)
    entropy = -torch.sum(original_probs * log_probs, dim=-1)
    assert temperature == 0
    samples = torch.argmax(logits, dim=-1)
    return entropy, samples


def d3llm_teacher(model, input_ids, gen_length, block_length, threshold=-float("inf")):
    """`_sample_with_trajectory` (no padding, attention 'full'); returns the trajectory list."""
    x = torch.nn.functional.pad(input_ids, (0, gen_length), value=MASK)
    num_blocks = gen_length // block_length
    trajectory = []
    for num_block in range(num_blocks):
        current_block_start = input_ids.shape[1] + num_block * block_length
        current_block_end = current_block_start + block_length
        while True:
            mask_index = x == MASK
            logits = model(x, attn_mode="bidirectional").logits
            mask_index[:, current_block_end:] = 0
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            mask_logits = logits[mask_index]
            entropy, x0 = d3llm_sample_tokens_with_entropy(mask_logits)
            x_ = torch.zeros_like(x, dtype=torch.long) + MASK
            full_entropy = torch.full_like(x, torch.inf, dtype=logits.dtype)
            x_[mask_index] = x0.clone()
            full_entropy[mask_index] = entropy
            current_transfer_tokens = (x[:, current_block_start:current_block_end] == MASK).sum()
            selected_entropy, select_index = torch.topk(full_entropy, current_transfer_tokens, largest=False)
            transfer_index = torch.zeros_like(x, dtype=torch.bool)
            transfer_index[0, select_index[0]] = True
            for k in range(1, current_transfer_tokens):
                if selected_entropy[0, k] < threshold:
                    transfer_index[0, select_index[0, k]] = True
                else:
                    transfer_index[0, select_index[0, k]] = False
            x[transfer_index] = x_[transfer_index].clone()
            trajectory.append(x.clone())
            if (x[:, current_block_start:current_block_end] == MASK).sum() == 0:
                break
    return trajectory


def orders_from_trajectory(trajectory, prompt_len, gen_length):
    """order[j] = the first step whose sequence has position j decoded."""
    steps = torch.stack([t[0, prompt_len:prompt_len + gen_length] for t in trajectory])  # [steps, gen]
    assert len(trajectory) == gen_length  # one token per step
    return (steps == MASK).sum(0).numpy()  # masked in steps 0..order-1, decoded from step `order` on


def test_teacher_orders_match_d3llm_loop_batched(one_thread):
    model = NoMaskModel(tiny_dllm(seed=3))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, MASK - 1, (n,), generator=g).tolist() for n in (6, 3, 9)]
    gen, block = 16, 8
    ours = teacher_orders(model, prompts, gen, block)
    for b, p in enumerate(prompts):
        ref = orders_from_trajectory(d3llm_teacher(model, torch.tensor([p]), gen, block), len(p), gen)
        assert ours[b].tolist() == ref.tolist(), (b, ours[b], ref)
        # Blocks are decoded in order, one token per step: block k holds steps [8k, 8k + 8).
        assert sorted(ours[b][:8].tolist()) == list(range(8)) and sorted(ours[b][8:].tolist()) == list(range(8, 16))
    alone = teacher_orders(model, prompts[1:2], gen, block)
    assert alone[0].tolist() == ours[1].tolist()


def test_low_entropy_alg_commits_the_lowest_entropy_position_per_step(one_thread):
    model = NoMaskModel(tiny_dllm(seed=5))
    prompt = torch.tensor([[5, 9, 2, 7]])
    seen = []
    kw = dict(max_new_tokens=8, steps=8, block_length=4, stop_at_eos=False, output_history=True)
    out = diffusion_generate(model, prompt, alg="low_entropy", step_callback=lambda s, x: seen.append(s), **kw)
    assert seen == list(range(1, 9)) and out.stats["nfe"] == 8
    ref = d3llm_teacher(model, prompt, 8, 4)
    for mine, theirs in zip(out.history, ref):
        assert torch.equal(mine, theirs)  # tokens and positions, step by step
    # On this model the entropy order is not the p(x0) order: the test tells the two rules apart.
    prob = diffusion_generate(model, prompt, alg="low_confidence", **kw)
    assert any(not torch.equal(a, b) for a, b in zip(out.history, prob.history))


def test_gen_length_rule():
    assert gen_length_for(1, 32) == 32 and gen_length_for(33, 32) == 64 and gen_length_for(40, 8, 256) == 256
    for bad in ((300, 32, 256), (10, 32, 40)):
        try:
            gen_length_for(*bad)
        except ValueError:
            continue
        raise AssertionError(bad)
    assert np.array_equal(np.sort(teacher_orders(NoMaskModel(tiny_dllm()), [[3, 4]], 4, 4)[0]), np.arange(4))
