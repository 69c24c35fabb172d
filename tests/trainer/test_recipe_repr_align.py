"""Repr-Align through the trainer: the live teacher and the anchor cache give the same run (the
cache built by scripts/precompute_anchors.py, resumably), and the teacher is in no checkpoint."""
import json
from pathlib import Path

import pytest

from tests.trainer.test_train_e2e import REPO, _args, _run

ALIGN = ("--train.repr_align_weight=10", "--train.align_layers=[0,1,-1]", "--train.align_token_fraction=0.5")


def _metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_keys(out, step):
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(Path(out) / "checkpoints" / f"global_step_{step}")).read_metadata()
    return set(meta.state_dict_metadata)


def _precompute(argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("precompute_anchors", REPO / "scripts" / "precompute_anchors.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    live, cached = root / "live", root / "cached"
    common = ("--train.max_steps=3", "--train.save_steps=2")
    _run(_args(tiny_model_dir, tiny_corpus, live, *common, *ALIGN))
    # The anchor cache over the same rows (same config and data cache), fp32: exact targets.
    anchors = root / "anchors"
    argv = [str(REPO / "configs/quickstart/smollm2_mdm.yaml"), "--out", str(anchors), "--dtype", "float32",
            "--batch_size", "3", "--no_progress", *_args(tiny_model_dir, tiny_corpus, cached, *ALIGN)]
    assert _precompute(argv) == 0
    stored = sorted(anchors.glob("*/*.pt"))
    stamps = [p.stat().st_mtime_ns for p in stored]
    assert _precompute(argv) == 0  # resumable: a finished cache is left as it is
    assert [p.stat().st_mtime_ns for p in sorted(anchors.glob("*/*.pt"))] == stamps and stored
    _run(_args(tiny_model_dir, tiny_corpus, cached, *common, *ALIGN, f"--train.align_cache_dir={anchors}"))
    return live, cached, anchors


def test_anchor_cache_equals_live_teacher(runs):
    live, cached, _ = runs
    a, b = _metrics(live), _metrics(cached)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "align_loss"):
            assert abs(ra[key] - rb[key]) <= 1e-5 * max(1.0, abs(ra[key])), (key, ra, rb)
    assert all(0 < r["align_loss"] <= 2 for r in a)


def test_teacher_is_in_no_checkpoint(runs, tiny_model_dir):
    live, _, _ = runs
    keys = _checkpoint_keys(live, 2)
    from veomni.models.hf_io import load_model

    student = {f"model.{n}" for n in load_model(tiny_model_dir).state_dict()}
    model_keys = {k for k in keys if k.startswith("model.")}
    # The student's parameters (embeddings grown by the mask row, same names) and its optimizer state only.
    assert model_keys == student
    assert not [k for k in keys if not k.startswith(("model.", "optim"))], [k for k in keys if not k.startswith("model.")][:5]
    assert not any("teacher" in k for k in keys)


def test_a_cache_for_other_settings_is_refused(runs, tiny_model_dir):
    from veomni.diffusion.repr_align import AnchorCache

    cache = AnchorCache(runs[2])
    with pytest.raises(ValueError, match="rows of 32 tokens, training uses data.max_seq_len=16"):
        cache.check(str(tiny_model_dir), [0], 16, 3)
    with pytest.raises(ValueError, match="was computed with"):
        cache.check(str(REPO / "configs/models/qwen3_5_tiny"), [0], 32, 3)
