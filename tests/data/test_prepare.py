import json
import math
import time

import numpy as np
import pytest

from fastllm.data import ByteTokenizer, Shard, load_tokenizer, prepare_dataset, read_meta, split_shards, unigram_entropy

DOCS = [f"document {i}: " + "abcdefghij"[: 1 + i % 10] * (1 + i % 7) for i in range(200)]


def shard_documents(data_dir, split):
    """The documents of a split decoded back from its shards, in order."""
    tok = load_tokenizer(data_dir)
    out = []
    for path in split_shards(data_dir, split):
        shard = Shard(path)
        ends = [*shard.doc_starts[1:], shard.num_tokens]
        for start, end in zip(shard.doc_starts, ends):
            ids = shard.tokens[start:end]
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
            out.append(tok.decode(ids))
    return out


def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    meta = prepare_dataset(DOCS, tmp_path / "a", val_fraction=0.1, seed=1, shard_tokens=500)
    train, val = shard_documents(tmp_path / "a", "train"), shard_documents(tmp_path / "a", "val")
    assert len(val) == 20 and sorted(train + val) == sorted(DOCS)  # exactly 1 in 10, nothing lost
    assert train == [d for d in DOCS if d not in val]  # source order kept
    assert len(meta["splits"]["train"]["shards"]) > 1  # shard_tokens respected, documents never split
    assert meta["splits"]["train"]["num_docs"] == 180
    prepare_dataset(DOCS, tmp_path / "b", val_fraction=0.1, seed=1, shard_tokens=500)
    assert shard_documents(tmp_path / "b", "val") == val
    prepare_dataset(DOCS, tmp_path / "c", val_fraction=0.1, seed=2)
    assert shard_documents(tmp_path / "c", "val") != val


def test_bpe_prepared_from_directory(tmp_path):
    pytest.importorskip("tokenizers")
    src = tmp_path / "src"
    src.mkdir()
    for i, doc in enumerate(DOCS):
        (src / f"{i:03d}.txt").write_text(doc)
    meta = prepare_dataset(src, tmp_path / "out", "bpe:300", val_fraction=0.1)
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] <= 300
    assert sorted(shard_documents(tmp_path / "out", "train") + shard_documents(tmp_path / "out", "val")) \
        == sorted(DOCS)


def test_reuse_overwrite_and_interrupted(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    out = tmp_path / "out"
    prepare_dataset(src, out)
    stamp = (out / "meta.json").stat().st_mtime_ns
    prepare_dataset(src, out)  # same arguments: reused as is
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prepare_dataset(src, out, seed=5)
    prepare_dataset(src, out, seed=5, overwrite=True)
    assert read_meta(out)["fingerprint"]["seed"] == 5
    (out / "meta.json").unlink()  # as if interrupted: redone without asking
    prepare_dataset(src, out)
    assert read_meta(out)["fingerprint"]["seed"] == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_dataset(src, tmp_path / "mine")


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no val documents"):
        prepare_dataset(DOCS[:3], tmp_path / "few", val_fraction=0.1)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_dataset(DOCS, tmp_path / "x", val_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        read_meta(tmp_path)


def test_unigram_entropy_matches_direct_count(tmp_path):
    prepare_dataset(DOCS, tmp_path, val_fraction=0.1)
    counts = {}
    for doc in shard_documents(tmp_path, "val"):
        for t in [*doc.encode(), ByteTokenizer.eos_id]:  # targets: every token but BoD
            counts[t] = counts.get(t, 0) + 1
    p = np.array(list(counts.values())) / sum(counts.values())
    expected = -(p * np.log(p)).sum()
    assert unigram_entropy(tmp_path, "val") == pytest.approx(expected, rel=1e-12)
    assert unigram_entropy(tmp_path, "val", unit="bits") == pytest.approx(expected / math.log(2), rel=1e-12)


def test_default_corpus_prepares_in_seconds(tmp_path):
    start = time.perf_counter()
    meta = prepare_dataset("default", tmp_path)
    assert time.perf_counter() - start < 20  # ~0.3 s on an idle 2-core machine
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["num_tokens"] > 1_000_000 and 0.01 < val["num_tokens"] / train["num_tokens"] < 0.2
    entropy = unigram_entropy(tmp_path, "val", unit="bits")
    assert 3.5 < entropy < 6.0  # Python source: far from uniform over bytes (8 bits)


def test_prepare_command(tmp_path, capsys):
    from fastllm.data.cli import main

    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"body": d}) for d in DOCS))
    assert main([str(src), "--out", str(tmp_path / "out"), "--text-field", "body", "--val-fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "val: " in out and "unigram entropy" in out
    assert read_meta(tmp_path / "out")["splits"]["val"]["num_docs"] == 20


def test_edited_source_is_not_reused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, doc in enumerate(DOCS):
        (src / f"{i:03d}.txt").write_text(doc)
    prepare_dataset(src, tmp_path / "out")
    (src / "000.txt").write_text("changed text, and longer")
    with pytest.raises(FileExistsError):
        prepare_dataset(src, tmp_path / "out")
    with pytest.raises(ValueError, match="bpe:VOCAB_SIZE"):
        prepare_dataset(src, tmp_path / "other", "bpe:big")


def test_changed_tokenizer_at_the_same_path_is_not_reused(tmp_path):
    # The tokenizer given by path is part of what the shards depend on: replacing the tokenizer saved at that
    # path must not silently return shards tokenised with the old one.
    pytest.importorskip("tokenizers")
    from fastllm.data import train_bpe

    tok_dir = tmp_path / "tok"
    train_bpe(DOCS, 270).save(tok_dir)
    first = prepare_dataset(DOCS, tmp_path / "bpe0", str(tok_dir), val_fraction=0.1)  # in-memory: no reuse
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    out = tmp_path / "out"
    assert prepare_dataset(src, out, str(tok_dir), val_fraction=0.1)["vocab_size"] == first["vocab_size"]
    train_bpe(DOCS, 300).save(tok_dir)  # another tokenizer, same path
    new_vocab = load_tokenizer(tok_dir).vocab_size
    assert new_vocab != first["vocab_size"]
    try:
        meta = prepare_dataset(src, out, str(tok_dir), val_fraction=0.1)
    except FileExistsError:
        return  # refusing is fine too; reusing stale shards is not
    assert meta["vocab_size"] == new_vocab == load_tokenizer(out).vocab_size
