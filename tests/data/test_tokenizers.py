import json

import numpy as np
import pytest

from fastllm.data import BPETokenizer, ByteTokenizer, load_tokenizer, train_bpe

TEXTS = ["def f(x):\n    return x + 1\n", "héllo wörld — ünïcode ✓\n", "class A:\n    pass\n"] * 20


def test_byte_roundtrip_and_special_ids():
    tok = ByteTokenizer()
    for text in TEXTS[:3] + [""]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
        assert np.array_equal(tok.encode_batch([text])[0], ids)
    assert {tok.bos_id, tok.eos_id} == {256, 257} and tok.vocab_size == 258
    assert tok.decode([tok.bos_id, *tok.encode("ab"), tok.eos_id]) == "ab"


def test_byte_save_load(tmp_path):
    ByteTokenizer().save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_bpe_train_roundtrip_save_load(tmp_path):
    pytest.importorskip("tokenizers")
    tok = train_bpe(TEXTS, 300)
    assert isinstance(tok, BPETokenizer) and 258 < tok.vocab_size <= 300
    assert tok.bos_id != tok.eos_id
    for text in TEXTS[:3]:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode())  # merges learned
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert (again.bos_id, again.eos_id, again.vocab_size) == (tok.bos_id, tok.eos_id, tok.vocab_size)
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    # A bare tokenizer.json (as released models ship it) loads too, special tokens recognised.
    assert load_tokenizer(tmp_path / "tokenizer.json").eos_id == tok.eos_id


def test_bpe_special_tokens_from_hf_config(tmp_path):
    tk = pytest.importorskip("tokenizers")
    raw = tk.Tokenizer(tk.models.BPE())
    raw.add_special_tokens(["<start>", "<stop>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="bos_token="):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<start>",
                                                                "eos_token": {"content": "<stop>"}}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (0, 1)


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        load_tokenizer(tmp_path / "nonexistent")
    with pytest.raises(FileNotFoundError, match="no fastllm_tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    pytest.importorskip("tokenizers")
    with pytest.raises(ValueError, match="broken.json"):
        load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(TEXTS, 100)


def test_bpe_special_token_text_in_documents_is_plain_text(tmp_path):
    # A document that merely contains the text "<|eod|>" (or a loaded tokenizer's special tokens) must not
    # produce the end-of-document id inside the document; it round-trips like any other string.
    pytest.importorskip("tokenizers")
    tok = train_bpe(TEXTS, 300)
    text = "a <|eod|> b<|bod|>c"
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text
    batch = tok.encode_batch([text])[0]
    assert batch.tolist() == ids
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(text) == ids and again.decode([again.bos_id, *ids, again.eos_id]) == text


def test_bpe_vocab_size_covers_every_id(tmp_path):
    # vocab_size sizes the shard dtype and the model's embedding: it must exceed every id, also when the
    # vocabulary of a tokenizer.json has holes.
    pytest.importorskip("tokenizers")
    tok = train_bpe(TEXTS, 300)
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = config["model"]["vocab"]
    token = max(vocab, key=vocab.get)
    vocab[token] = 1000  # a hole: ids up to 999 unused
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    again = load_tokenizer(tmp_path)
    assert max(again._tok.get_vocab(with_added_tokens=True).values()) == 1000
    assert again.vocab_size == 1001
