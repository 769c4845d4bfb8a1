import gzip
import json
import sysconfig
from pathlib import Path

import pytest

from fastllm.data import DEFAULT_CORPUS_MAX_BYTES, default_corpus, iter_documents
from fastllm.data.sources import stdlib_files


def test_text_directory_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("third")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "b" / "a.py").write_text("second")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")  # not a document
    assert list(iter_documents(tmp_path)) == ["first", "second", "third"]


def test_jsonl_plain_and_gzip(tmp_path):
    rows = [{"text": "one", "id": 1}, {"text": "two"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "three"}) + "\n")
    assert list(iter_documents(tmp_path / "d.jsonl")) == ["one", "two"]
    assert list(iter_documents(tmp_path / "e.jsonl.gz", text_field="body")) == ["three"]


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        list(iter_documents(path))
    path.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*'text'"):
        list(iter_documents(path))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["alpha", None, "beta"], "n": [1, 2, 3]}), tmp_path / "t.parquet",
                   row_group_size=1)
    assert list(iter_documents(tmp_path / "t.parquet")) == ["alpha", "beta"]
    with pytest.raises(ValueError, match=r"t\.parquet: no column 'body'"):
        list(iter_documents(tmp_path / "t.parquet", text_field="body"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"junk\.parquet: not a readable Parquet file"):
        list(iter_documents(tmp_path / "junk.parquet"))


def test_iterables_of_strings_and_records():
    assert list(iter_documents(["a", "b"])) == ["a", "b"]
    assert list(iter_documents([{"text": "a"}, {"text": "b"}])) == ["a", "b"]
    with pytest.raises(ValueError, match="document 1"):
        list(iter_documents(["a", 3]))


def test_hugging_face_dataset_object():
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"text": ["x", "y"], "other": [1, 2]})
    assert list(iter_documents(dataset)) == ["x", "y"]


def test_missing_sources():
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list(iter_documents("/nowhere/at/all"))
    with pytest.raises(TypeError, match="source must be"):
        list(iter_documents(42))


def test_default_corpus_is_the_stdlib_deterministic_and_capped():
    files = stdlib_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(stdlib).parts for f in files]
    assert any(r == ("argparse.py",) for r in rel) and any(r[0] == "json" for r in rel)
    assert not any({"site-packages", "test", "tests"} & set(r) for r in rel)
    docs = list(default_corpus())
    assert docs == list(default_corpus())
    size = sum(len(d.encode()) for d in docs)
    assert 1_000_000 < size <= DEFAULT_CORPUS_MAX_BYTES
    assert docs[0] == next(f.read_text() for f in files if f.read_text().strip())
    assert sum(len(d.encode()) for d in default_corpus(max_bytes=50_000)) <= 50_000


def test_hugging_face_source_string(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "part.jsonl").write_text('{"text": "first"}\n{"text": "second"}\n')
    assert list(iter_documents(f"hf:{tmp_path}")) == ["first", "second"]


def test_jsonl_gz_suffix_any_case(tmp_path):
    with gzip.open(tmp_path / "E.JSONL.GZ", "wt") as f:
        f.write(json.dumps({"text": "upper"}) + "\n")
    assert list(iter_documents(tmp_path / "E.JSONL.GZ")) == ["upper"]
    assert list(iter_documents(tmp_path)) == ["upper"]
