"""File discovery, record validation, malformed-line errors and skip counts."""
import os

import pytest

from veomni.data import DataFormatError, build_dataset, resolve_files
from veomni.data.readers import ReaderOptions, iter_records


def _touch(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_resolve_dir_recursive_sorted_and_filtered(tmp_path):
    b = _touch(tmp_path / "d" / "b.txt")
    a = _touch(tmp_path / "d" / "sub" / "a.py")
    j = _touch(tmp_path / "d" / "a.jsonl")
    _touch(tmp_path / "d" / "img.png")  # not a text suffix: ignored inside a directory
    _touch(tmp_path / "d" / ".git" / "x.txt")  # hidden directory: ignored
    _touch(tmp_path / "d" / ".hidden.txt")
    assert resolve_files(tmp_path / "d") == [j, b, a]


def test_resolve_glob_list_and_errors(tmp_path):
    a = _touch(tmp_path / "a.jsonl")
    b = _touch(tmp_path / "b.jsonl")
    c = _touch(tmp_path / "c.md")
    assert resolve_files(str(tmp_path / "*.jsonl")) == [a, b]
    assert resolve_files([c, str(tmp_path / "*.jsonl")]) == [c, a, b]
    with pytest.raises(FileNotFoundError, match="matched no file"):
        resolve_files(str(tmp_path / "*.parquet"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_files(tmp_path / "missing.jsonl")
    png = _touch(tmp_path / "x.png")
    with pytest.raises(ValueError, match="unsupported file type"):
        resolve_files(png)
    assert resolve_files(png, text_suffixes=(".png",)) == [png]


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"text": "ok"', "JSONDecodeError"),
        ('{"body": "no text key"}', "missing key 'text'"),
        ('{"text": 42}', "must be a string"),
        ('{"text": "   "}', "is empty"),
        ('["text"]', "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, jsonl, line, reason):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "first"}, {"text": "second"}, line, {"text": "fourth"}])
    with pytest.raises(DataFormatError) as e:
        list(iter_records([path], ReaderOptions(), {}))
    msg = str(e.value)
    assert f"{path}:3" in msg and reason in msg and "skip_bad_lines" in msg


def test_sft_record_errors(tmp_path, jsonl):
    opts = ReaderOptions(data_type="sft")
    cases = [
        ({"prompt": "p"}, "missing key 'response'"),
        ({"prompt": "p", "response": ""}, "is empty"),
        ({"messages": [{"role": "user", "content": "q"}]}, "must end with an assistant turn"),
        ({"messages": [{"role": "user"}]}, "string 'role' and 'content'"),
        ({"messages": [], "prompt": "p", "response": "r"}, "keep one"),
    ]
    for i, (rec, reason) in enumerate(cases):
        path = jsonl(tmp_path / f"s{i}.jsonl", [rec])
        with pytest.raises(DataFormatError, match=reason):
            list(iter_records([path], opts, {}))
    txt = _touch(tmp_path / "t.txt", "hello")
    with pytest.raises(DataFormatError, match="plain-text files are pretraining documents"):
        list(iter_records([txt], opts, {}))


def test_custom_text_key_and_blank_lines(tmp_path, jsonl):
    path = jsonl(tmp_path / "d.jsonl", [{"content": "a"}, "", "   ", {"content": "b"}])
    recs = list(iter_records([path], ReaderOptions(text_key="content"), {}))
    assert [(n, r) for _, n, r in recs] == [(1, "a"), (4, "b")]


def test_skip_bad_lines_counts_per_file(tmp_path, jsonl, qwen_tok, caplog):
    good = jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    bad = jsonl(tmp_path / "b.jsonl", [{"text": "three"}, "{oops", {"text": ""}, {"x": 1}, {"text": "four"}])
    undecodable = tmp_path / "c.jsonl"
    undecodable.write_bytes(b'{"text": "\xff\xfe"}\n{"text": "five"}\n')
    with pytest.raises(DataFormatError, match=f"{bad}:2"):
        build_dataset([good, bad], qwen_tok, max_seq_len=16)
    with caplog.at_level("WARNING"):
        ds = build_dataset([good, bad, str(undecodable)], qwen_tok, max_seq_len=16, skip_bad_lines=True)
    assert ds.skipped == {bad: 3, str(undecodable): 1}
    assert ds.num_docs == 5
    assert "skipped 4 bad record(s)" in caplog.text


def test_empty_text_file_is_bad(tmp_path, qwen_tok):
    empty = _touch(tmp_path / "e.txt", "  \n")
    ok = _touch(tmp_path / "o.txt", "fine")
    with pytest.raises(DataFormatError, match="e.txt: DataFormatError: file content is empty"):
        build_dataset([empty, ok], qwen_tok, max_seq_len=16)
    ds = build_dataset([empty, ok], qwen_tok, max_seq_len=16, skip_bad_lines=True)
    assert ds.skipped == {empty: 1} and ds.num_docs == 1


def test_bad_options():
    with pytest.raises(ValueError, match="data_type"):
        ReaderOptions(data_type="dpo")
    with pytest.raises(ValueError, match="must start with '.'"):
        ReaderOptions(text_suffixes=("txt",))
