"""Every config under configs/quickstart/ runs as it is from the repository root."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from veomni.config.parser import parse_args
from veomni.models.embedded import is_embedded, resolve_model_path

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = sorted((REPO / "configs" / "quickstart").glob("*.yaml"))


def test_embedded_model_names():
    assert resolve_model_path("/some/dir") == "/some/dir"
    with pytest.raises(ValueError, match="known: \\['embedded:smollm2-135m-instruct', 'embedded:all-minilm-l6-v2'\\]"):
        resolve_model_path("embedded:gpt-17")


@pytest.mark.parametrize("config", QUICKSTART, ids=lambda p: p.name)
def test_quickstart_config_names_its_model_and_corpus(config):
    args = parse_args(argv=[str(config)])
    assert is_embedded(args.model.model_path) or Path(args.model.model_path).exists()
    assert args.data.train_path and (REPO / args.data.train_path).exists(), args.data.train_path


@pytest.mark.parametrize("config", QUICKSTART, ids=lambda p: p.name)
def test_quickstart_config_trains_as_it_is(config, smollm2_dir, tmp_path):
    # Only the length and the outputs are shortened; model and data come from the config itself.
    cmd = [sys.executable, "tasks/train_torch.py", str(config.relative_to(REPO)), f"--train.output_dir={tmp_path}",
           "--train.max_steps=1", "--train.warmup_steps=0", "--train.eval_steps=0", "--train.export_hf=false", "--train.progress_bar=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="2"), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["loss"] > 0
    resolved = yaml.safe_load((tmp_path / "resolved_config.yaml").read_text())
    assert resolved["model"]["model_path"] == parse_args(argv=[str(config)]).model.model_path
