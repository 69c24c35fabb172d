"""Likelihood of a text under our models: masked-diffusion ELBO (Monte Carlo) and exact AR.

    from veomni.eval.likelihood import mc_elbo, block_elbo, ar_loglik
    r = mc_elbo(model, prompt_ids, target_ids, mc_num=128, batch_size=32, mask_id=m, logit_shift=True)
    r = block_elbo(model, prompt_ids, target_ids, block_size=32)   # block-diffusion (bd3lm) models
    r["nll"]          # estimate of an upper bound on -log p(target | prompt), nats
    ll = ar_loglik(model, ids, prompt_len)["loglik"]     # exact sum log p(ids[t] | ids[:t]), t >= prompt_len

The ELBO estimator is LLaDA's stratified one (its `get_log_likelihood`, NOTES §6): a mini-batch holds
b copies of prompt + target; with k ~ U{1..T} drawn once per mini-batch, copy j masks exactly
m_j = ((k - 1 + round(j*T/b)) mod T) + 1 of the T target tokens, chosen uniformly; its loss is
sum CE(masked) / (m_j / T). Each m_j is marginally uniform on {1..T}, so every copy is an unbiased
draw of E_{m ~ U{1..T}} E_{|S| = m} [ (T/m) sum_{i in S} CE_i ], the bound; stratifying m across the
copies lowers the variance. The prompt is never masked.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def stratified_mask_counts(k: int, T: int, b: int) -> list:
    """m_j for j < b: LLaDA's evenly spread mask counts, all in 1..T.

    round(j*T/b) is done in integers (half rounds up) so the counts do not depend on float ties.
    """
    return [((k - 1 + (2 * j * T + b) // (2 * b)) % T) + 1 for j in range(b)]


def _as_1d(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"expected one sequence of token ids (1-D), got shape {tuple(ids.shape)}")
    return ids


@torch.no_grad()
def mc_elbo(model, prompt_ids, target_ids, mc_num: int = 128, batch_size: int = 32,
            mask_id: Optional[int] = None, logit_shift: Optional[bool] = None,
            generator: Optional[torch.Generator] = None, attn_mode: Optional[str] = None) -> dict:
    """Monte-Carlo ELBO of `target_ids` given `prompt_ids` under a masked-diffusion model.

    mask_id / logit_shift default to the model config (mask_token_id, dllm_logit_shift, else True);
    attn_mode to config.dllm_attn_mode. mc_num must be a multiple of batch_size (LLaDA's rule: whole
    stratified mini-batches). Returns nll (nats, the negative ELBO), elbo (= -nll), nll_per_token,
    ppl_bound = exp(nll_per_token), stderr (of nll, from the spread of the per-copy estimates;
    conservative because stratified copies are negatively correlated), n_tokens, mc_num.
    """
    cfg = getattr(model, "config", None)
    mask_id = getattr(cfg, "mask_token_id", None) if mask_id is None else mask_id
    if mask_id is None:
        raise ValueError("mc_elbo needs a mask token: pass mask_id= or use a model whose config has "
                         "mask_token_id (a trained dLLM); for an AR model use ar_loglik")
    if logit_shift is None:
        logit_shift = bool(getattr(cfg, "dllm_logit_shift", True) if cfg is not None else True)
    prompt, target = _as_1d(prompt_ids), _as_1d(target_ids)
    T, P = target.numel(), prompt.numel()
    if T == 0:
        raise ValueError("mc_elbo: the target is empty")
    if logit_shift and P == 0:
        raise ValueError("mc_elbo: a logit-shifted model predicts token i from position i-1, so the "
                         "first target token needs a prompt token before it; prepend BOS (or EOS)")
    if mc_num < 1 or batch_size < 1 or mc_num % batch_size:
        raise ValueError(f"mc_num ({mc_num}) must be a positive multiple of batch_size ({batch_size})")
    dev = next(model.parameters()).device
    seq = torch.cat([prompt, target]).to(dev)
    per_copy = []
    for _ in range(mc_num // batch_size):
        b = batch_size
        k = int(torch.randint(1, T + 1, (), generator=generator))
        counts = stratified_mask_counts(k, T, b)
        masked = torch.zeros(b, T, dtype=torch.bool)
        for j, m in enumerate(counts):
            masked[j, torch.randperm(T, generator=generator)[:m]] = True
        masked = masked.to(dev)
        x = seq.repeat(b, 1)
        x[:, P:] = torch.where(masked, torch.full_like(masked, mask_id, dtype=torch.long), x[:, P:])
        logits = model(x, attn_mode=attn_mode).logits.float()
        # Shifted (AR-initialised) models read token i at position i-1, LLaDA-style ones at i.
        tgt_logits = logits[:, P - 1:-1] if logit_shift else logits[:, P:]
        ce = F.cross_entropy(tgt_logits.reshape(-1, tgt_logits.shape[-1]), seq[P:].repeat(b),
                             reduction="none").view(b, T)
        weight = torch.tensor([T / m for m in counts], device=dev)
        per_copy.append(((ce * masked).sum(1) * weight).cpu())
    est = torch.cat(per_copy).double()
    nll = float(est.mean())
    stderr = float(est.std(unbiased=True) / math.sqrt(est.numel())) if est.numel() > 1 else float("nan")
    return dict(nll=nll, elbo=-nll, nll_per_token=nll / T, ppl_bound=math.exp(nll / T), stderr=stderr,
                n_tokens=T, mc_num=mc_num)


@torch.no_grad()
def block_elbo(model, prompt_ids, target_ids, block_size: Optional[int] = None, mc_num: int = 128,
               batch_size: int = 32, mask_id: Optional[int] = None, logit_shift: Optional[bool] = None,
               generator: Optional[torch.Generator] = None) -> dict:
    """Monte-Carlo ELBO of `target_ids` given `prompt_ids` under a BLOCK-diffusion model (trained with
    train.objective=bd3lm): the sum over blocks of each block's masked-diffusion bound given the
    clean blocks before it, computed in one forward over two-stream rows [x_t ; x_0] (the training
    layout, veomni/diffusion/bd3lm.py). Blocks are position blocks (position // block_size; the
    first target block may share its block with the end of the prompt). In every mini-batch each
    block draws its own k and LLaDA's stratified counts over its target tokens (`mc_elbo`), so every
    block's term is an unbiased estimate of its bound. Same return keys as mc_elbo.

    mc_elbo applied to a block-causal model masks across blocks and scores later blocks given noisy
    earlier ones: a looser bound than the one such a model is trained and decoded with."""
    cfg = getattr(model, "config", None)
    mask_id = getattr(cfg, "mask_token_id", None) if mask_id is None else mask_id
    block_size = getattr(cfg, "dllm_block_size", None) if block_size is None else block_size
    if mask_id is None or not block_size:
        raise ValueError("block_elbo needs a mask token and a block size (a model trained with train.objective="
                         "bd3lm records both: config.mask_token_id, config.dllm_block_size)")
    if logit_shift is None:
        logit_shift = bool(getattr(cfg, "dllm_logit_shift", True) if cfg is not None else True)
    prompt, target = _as_1d(prompt_ids), _as_1d(target_ids)
    T, P = target.numel(), prompt.numel()
    if T == 0 or (logit_shift and P == 0):
        raise ValueError("block_elbo: need a non-empty target, and a prompt token before it for a shifted model")
    if mc_num < 1 or batch_size < 1 or mc_num % batch_size:
        raise ValueError(f"mc_num ({mc_num}) must be a positive multiple of batch_size ({batch_size})")
    dev = next(model.parameters()).device
    seq = torch.cat([prompt, target]).to(dev)
    n = P + T
    block = torch.arange(P, n) // block_size  # block of each target token
    groups = [torch.nonzero(block == b)[:, 0] for b in block.unique()]
    pos = torch.arange(n, device=dev).repeat(2)[None]
    clean = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(dev)[None]
    per_copy = []
    for _ in range(mc_num // batch_size):
        b = batch_size
        masked = torch.zeros(b, T, dtype=torch.bool)
        weight = torch.zeros(b, T)
        for idx in groups:  # each block: its own stratified counts
            tb = idx.numel()
            counts = stratified_mask_counts(int(torch.randint(1, tb + 1, (), generator=generator)), tb, b)
            for j, m in enumerate(counts):
                masked[j, idx[torch.randperm(tb, generator=generator)[:m]]] = True
                weight[j, idx] = tb / m
        masked, weight = masked.to(dev), weight.to(dev)
        noisy = seq.repeat(b, 1)
        noisy[:, P:] = torch.where(masked, torch.full_like(masked, mask_id, dtype=torch.long), noisy[:, P:])
        x = torch.cat([noisy, seq.repeat(b, 1)], dim=1)
        logits = model(x, position_ids=pos.expand(b, -1), clean_stream=clean.expand(b, -1), attn_mode="block_causal",
                       block_size=block_size).logits[:, :n].float()
        tgt_logits = logits[:, P - 1:n - 1] if logit_shift else logits[:, P:n]
        ce = F.cross_entropy(tgt_logits.reshape(-1, tgt_logits.shape[-1]), seq[P:].repeat(b),
                             reduction="none").view(b, T)
        per_copy.append((ce * masked * weight).sum(1).cpu())
    est = torch.cat(per_copy).double()
    nll = float(est.mean())
    stderr = float(est.std(unbiased=True) / math.sqrt(est.numel())) if est.numel() > 1 else float("nan")
    return dict(nll=nll, elbo=-nll, nll_per_token=nll / T, ppl_bound=math.exp(nll / T), stderr=stderr,
                n_tokens=T, mc_num=mc_num)


@torch.no_grad()
def ar_loglik(model, ids, prompt_len: int) -> dict:
    """Exact log-likelihood of ids[prompt_len:] given ids[:prompt_len] with causal attention.

    Returns loglik (nats), nll_per_token, ppl = exp(nll_per_token), n_tokens. prompt_len >= 1 (the
    first token has no prediction: start with BOS to score it).
    """
    ids = _as_1d(ids)
    if not 1 <= prompt_len < ids.numel():
        raise ValueError(f"ar_loglik: need 1 <= prompt_len < len(ids) (got {prompt_len}, {ids.numel()})")
    dev = next(model.parameters()).device
    logits = model(ids[None].to(dev), attn_mode="causal").logits.float()[0]
    logp = torch.log_softmax(logits[:-1], dim=-1)  # row t predicts token t+1
    tgt = ids[1:].to(dev)
    token_lp = logp.gather(-1, tgt[:, None])[:, 0][prompt_len - 1:]
    n = token_lp.numel()
    ll = float(token_lp.sum())
    return dict(loglik=ll, nll_per_token=-ll / n, ppl=math.exp(-ll / n), n_tokens=n)
