"""Data loader throughput on the CPU: PackedLoader (with and without Goldfish) against nanoGPT-style
random windows from a memory-mapped token file (no documents, no shuffling guarantees, no resume)."""

import numpy as np
import pytest
import torch

from fastllm.data import PackedLoader
from fastllm.data.shards import ShardWriter

BATCH, SEQ = 16, 1024


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("bench") / "shard.bin"
    writer = ShardWriter(path, np.uint16)
    for length in rng.integers(200, 4000, 2000):
        writer.add(rng.integers(0, 50304, length))
    return writer.close()


def bytes_moved():
    return 3 * BATCH * SEQ * 8  # three int64 (B, T) outputs


@pytest.mark.parametrize("goldfish", [False, True], ids=["plain", "goldfish"])
def test_packed_loader(timer, shard, goldfish):
    loader = PackedLoader(shard, batch_size=BATCH, seq_len=SEQ, seed=0,
                          goldfish_k=50 if goldfish else None, goldfish_h=50 if goldfish else None)
    timer(lambda: next(loader), group=f"loader {BATCH}x{SEQ}", device="cpu", bytes_moved=bytes_moved(),
          name="fastllm PackedLoader" + (" goldfish" if goldfish else ""), rounds=30)


def test_random_windows_baseline(timer, shard):
    tokens = np.memmap(shard, dtype=np.uint16, mode="r", offset=64)
    rng = np.random.default_rng(0)

    def get_batch():
        starts = rng.integers(0, 1_000_000, BATCH)
        x = torch.from_numpy(np.stack([tokens[s:s + SEQ].astype(np.int64) for s in starts]))
        y = torch.from_numpy(np.stack([tokens[s + 1:s + 1 + SEQ].astype(np.int64) for s in starts]))
        return x, y

    timer(get_batch, group=f"loader {BATCH}x{SEQ}", device="cpu", bytes_moved=2 * BATCH * SEQ * 8,
          name="nanoGPT random windows", rounds=30)
