import numpy as np
import pytest

from fastllm.data import Shard, ShardError
from fastllm.data.shards import HEADER_SIZE, ShardWriter


def write_shard(path, docs, dtype=np.uint16):
    writer = ShardWriter(path, dtype)
    for doc in docs:
        writer.add(np.asarray(doc))
    return writer.close()


DOCS = [[256, 1, 2, 3, 257], [256, 70, 257], [256, *range(40, 60), 257]]


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_roundtrip_memory_mapped(tmp_path, dtype):
    path = write_shard(tmp_path / "a.bin", DOCS, dtype)
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temporary file left
    shard = Shard(path)
    assert isinstance(shard.tokens, np.memmap) and shard.tokens.dtype == np.dtype(dtype)
    assert shard.num_tokens == sum(map(len, DOCS)) and shard.num_docs == 3
    assert np.array_equal(shard.tokens, np.concatenate(DOCS))
    assert shard.doc_starts.tolist() == [0, 5, 8]


def test_truncated_shard_names_file(tmp_path):
    path = write_shard(tmp_path / "a.bin", DOCS)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(ShardError, match=r"a\.bin: truncated or corrupt"):
        Shard(path)
    path.write_bytes(data[:10])
    with pytest.raises(ShardError, match=r"a\.bin: truncated shard"):
        Shard(path)


def test_corrupt_shard_names_file(tmp_path):
    path = write_shard(tmp_path / "a.bin", DOCS)
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + 3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"a\.bin: corrupt shard: checksum"):
        Shard(path)
    assert Shard(path, verify=False).num_tokens == sum(map(len, DOCS))
    path.write_bytes(b"NOTSHARD" + bytes(data[8:]))
    with pytest.raises(ShardError, match=r"a\.bin: not a fastllm token shard"):
        Shard(path)
    with pytest.raises(ShardError, match=r"missing\.bin: shard file does not exist"):
        Shard(tmp_path / "missing.bin")


def test_writer_rejects_bad_documents_and_aborts_cleanly(tmp_path):
    writer = ShardWriter(tmp_path / "a.bin", np.uint16)
    with pytest.raises(ValueError, match="empty document"):
        writer.add(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="out of range"):
        writer.add(np.array([70000]))
    writer.abort()
    assert list(tmp_path.iterdir()) == []
