"""scripts/bench_train.py on a tiny model: the variants load together and take turns (CPU), every row
computes the same loss at step 0 (the script asserts it), and a ratio row stands beside each variant.
Structure only: no timing is asserted."""
import re
import subprocess
import sys
from pathlib import Path

from tests.models.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def test_variants_take_turns_and_agree_on_the_loss(smollm2_dir, tmp_path):
    from veomni.models.hf_io import load_tokenizer

    model = save_tiny_model(tmp_path / "tiny", load_tokenizer(str(smollm2_dir)), mask=False)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), f"--model_path={model}",
                           "--batch=1", "--seq=16", "--steps=2", "--skip_loss", "--compile"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "in turns (one step of each variant per round)" in out
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+) \| ([\d.]+) \|", out, re.M)}
    assert set(rows) == {"hf", "ours", "ours_compile"}, out
    losses = re.findall(r"^\| \w+ \| [\d.]+ \| \d+ \| [\d.]+% \| \d+ \| ([\d.]+) \|$", out, re.M)
    assert len(losses) == 3 and len(set(losses)) == 1, out  # same batch, same loss (to 4 decimals)
    assert re.search(r"^\| ours / hf \|", out, re.M) and re.search(r"^\| ours_compile / hf \|", out, re.M)
