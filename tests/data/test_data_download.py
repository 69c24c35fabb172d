"""scripts/download_data.py on local files (no hub here): files mode, datasets -> JSONL, errors."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "download_data.py"
_spec = importlib.util.spec_from_file_location("download_data", SCRIPT)
dl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dl)


def test_files_from_a_local_mirror_with_include(tmp_path, corpus):
    src = corpus(tmp_path / "mirror")
    os.makedirs(os.path.join(src, "sub"))
    Path(src, "sub", "x.jsonl").write_text('{"text": "x"}\n')
    assert dl.main(["--repo_id", src, "--local_dir", str(tmp_path / "out"), "--include", "part-*", "sub/*"]) == 0
    got = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert got == ["part-0.jsonl", "part-1.jsonl", "part-p.parquet", "sub/x.jsonl"]
    with pytest.raises(FileNotFoundError, match="no file matching"):
        dl.main(["--repo_id", src, "--local_dir", str(tmp_path / "o2"), "--include", "*.csv"])


def test_files_from_the_hub_call(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert dl.main(["--preset", "fineweb-10bt", "--local_dir", str(tmp_path / "fw")]) == 0
    assert calls == [dict(repo_id="HuggingFaceFW/fineweb", repo_type="dataset", local_dir=str(tmp_path / "fw"),
                          allow_patterns=["sample/10BT/*"], revision=None)]
    assert dl.main(["--repo_id", "fredzzp/fine_code", "--local_dir", str(tmp_path / "fc")]) == 0
    assert calls[-1]["repo_id"] == "fredzzp/fine_code" and calls[-1]["allow_patterns"] is None


def test_offline_is_a_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--repo_id", "fredzzp/fine_code", "--local_dir",
                           str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "could not download 'fredzzp/fine_code'" in proc.stderr and "cannot reach the Hub" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_to_jsonl_through_datasets_resumes_and_is_idempotent(tmp_path, corpus):
    pytest.importorskip("datasets")
    src = corpus(tmp_path / "src", n_jsonl=3, parquet_rows=0, text_files=0)  # 24 records, 3 shards
    out = tmp_path / "out"
    argv = ["--repo_id", src, "--local_dir", str(out), "--to_jsonl", "--fields", "text", "--max_records", "20",
            "--records_per_shard", "6"]
    assert dl.main(argv) == 0
    man = json.loads((out / "download_manifest.json").read_text())
    assert man["complete"] and man["records"] == 20 and [s["records"] for s in man["shards"]] == [6, 6, 6, 2]
    records = [json.loads(line) for s in man["shards"] for line in (out / s["name"]).read_text().splitlines()]
    originals = [json.loads(line) for f in sorted(Path(src).glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert records == [{"text": r["text"]} for r in originals[:20]]
    # An interrupted download (last two shards lost) continues where its manifest says.
    before = {s["name"]: (out / s["name"]).read_text() for s in man["shards"]}
    man["shards"], man["records"], man["complete"] = man["shards"][:2], 12, False
    (out / "download_manifest.json").write_text(json.dumps(man))
    for name in ("train-00002.jsonl", "train-00003.jsonl"):
        (out / name).unlink()
    assert dl.main(argv) == 0
    assert {n: (out / n).read_text() for n in before} == before
    assert dl.main(argv) == 0  # complete: nothing to do
    with pytest.raises(ValueError, match="other max_records"):
        dl.main(argv[:-3] + ["10", "--records_per_shard", "6"])
    with pytest.raises(KeyError, match="no field"):
        dl.main(["--repo_id", src, "--local_dir", str(tmp_path / "o3"), "--to_jsonl", "--fields", "body"])
