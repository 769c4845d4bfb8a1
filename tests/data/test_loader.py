import io

import numpy as np
import pytest
import torch

from fastllm.data import IGNORE_INDEX, PackedLoader, Shard, ShardError, goldfish_mask, prepare_dataset, split_shards

BOS = 256


def random_docs(n, seed, letters="abcdefghijklmnopqrstuvwxyz \n"):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(letters), rng.integers(5, 120))) for _ in range(n)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs"
    prepare_dataset(random_docs(150, 0), path, val_fraction=0.1, shard_tokens=3000)
    return path


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_batch_layout_labels_and_doc_ids(data_dir):
    loader = PackedLoader(data_dir, batch_size=3, seq_len=33, seed=0)
    assert len(loader.sources[0].shards) > 1  # windows come from several shards
    for batch in take(loader, 20):
        ids, labels, docs = batch["input_ids"], batch["labels"], batch["doc_ids"]
        assert all(t.shape == (3, 33) and t.dtype == torch.int64 for t in (ids, labels, docs))
        new_doc = ids[:, 1:] == BOS
        # Next-token labels within a document, -100 exactly where the next token starts another document.
        assert torch.equal(labels[:, :-1] == IGNORE_INDEX, new_doc)
        assert torch.equal(labels[:, :-1][~new_doc], ids[:, 1:][~new_doc])
        assert torch.equal(docs[:, 0], torch.zeros(3, dtype=torch.int64))
        assert torch.equal(docs[:, 1:] - docs[:, :-1], new_doc.long())
        assert (labels != BOS).all()


def test_each_epoch_visits_every_window_once_in_a_new_order(data_dir):
    loader = PackedLoader(data_dir, batch_size=1, seq_len=50, seed=3)
    n = loader.sources[0].num_windows
    shard = [Shard(p) for p in split_shards(data_dir, "train")]
    expected = {tuple(s.tokens[i * 50:i * 50 + 50]) for s in shard for i in range((s.num_tokens - 1) // 50)}
    epochs = [[tuple(b["input_ids"][0].tolist()) for b in take(loader, n)] for _ in range(2)]
    assert set(epochs[0]) == set(epochs[1]) == expected and len(expected) == n
    assert epochs[0] != epochs[1]


def test_deterministic_by_seed(data_dir):
    a = take(PackedLoader(data_dir, batch_size=2, seq_len=16, seed=7), 5)
    assert_same_batches(a, take(PackedLoader(data_dir, batch_size=2, seq_len=16, seed=7), 5))
    b = take(PackedLoader(data_dir, batch_size=2, seq_len=16, seed=8), 5)
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


@pytest.mark.parametrize("goldfish", [False, True])
def test_exact_resume(data_dir, goldfish):
    kwargs = dict(batch_size=2, seq_len=40, seed=1, goldfish_k=3 if goldfish else None,
                  goldfish_h=4 if goldfish else None)
    loader = PackedLoader(data_dir, **kwargs)
    n = loader.sources[0].num_windows
    steps = n // 2 + 3  # crosses an epoch boundary
    take(loader, steps - 4)
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)
    expected = take(loader, 4)
    resumed = PackedLoader(data_dir, **kwargs)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_batches(take(resumed, 4), expected)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, data_dir):
    other = tmp_path_factory.mktemp("data") / "digits"
    prepare_dataset(random_docs(60, 1, letters="0123456789"), other, val_fraction=0.1)
    return [data_dir, other]


def test_mixture_weights(mixture):
    loader = PackedLoader({mixture[0]: 3.0, mixture[1]: 1.0}, batch_size=4, seq_len=20, seed=0)
    digits_share = []
    for batch in take(loader, 25):
        for row in batch["input_ids"]:
            text = bytes(t for t in row.tolist() if t < 256).decode()
            is_digits = all(c.isdigit() or c == "\n" for c in text)
            assert is_digits or not any(c.isdigit() for c in text)  # a row comes from one source
            digits_share.append(is_digits)
    counts = np.cumsum(digits_share)
    # Every prefix of the sample stream holds the weights' share up to one sample.
    assert np.all(np.abs(counts - 0.25 * np.arange(1, 101)) <= 1)
    assert loader.state_dict()["counts"] == [75, 25]


@pytest.mark.parametrize("sources", ["one", "mixture"])
def test_ranks_together_equal_single_process(data_dir, mixture, sources):
    data = data_dir if sources == "one" else mixture
    kwargs = dict(seq_len=24, seed=5, goldfish_k=4, goldfish_h=6,
                  weights=None if sources == "one" else [0.6, 0.4])
    single = take(PackedLoader(data, batch_size=6, **kwargs), 12)
    ranks = [take(PackedLoader(data, batch_size=2, rank=r, world_size=3, **kwargs), 12) for r in range(3)]
    for step, batch in enumerate(single):
        for key in batch:
            assert torch.equal(batch[key], torch.cat([ranks[r][step][key] for r in range(3)]))
    rows = [tuple(row.tolist()) for r in range(3) for b in ranks[r] for row in b["input_ids"]]
    assert len(set(rows)) == len(rows)  # ranks read disjoint samples


def test_goldfish_labels_match_the_stream_mask(data_dir):
    # Whatever the window alignment, a dropped label is exactly one the mask drops on the whole shard.
    k, h, seed = 3, 5, 11
    plain = PackedLoader(data_dir, batch_size=4, seq_len=30, seed=2)
    fish = PackedLoader(data_dir, batch_size=4, seq_len=30, seed=2, goldfish_k=k, goldfish_h=h, goldfish_seed=seed)
    masks = {}
    for path in split_shards(data_dir, "train"):
        shard = Shard(path)
        doc_ids = np.searchsorted(shard.doc_starts, np.arange(shard.num_tokens), side="right")
        tokens = np.asarray(shard.tokens, dtype=np.int64)
        masks[path] = (tokens, goldfish_mask(tokens, k, h, seed, doc_ids=doc_ids))
    dropped = kept = 0
    for a, b in zip(take(plain, 10), take(fish, 10)):
        assert torch.equal(a["input_ids"], b["input_ids"])
        extra = (b["labels"] == IGNORE_INDEX) & (a["labels"] != IGNORE_INDEX)
        assert torch.equal(b["labels"][~extra], a["labels"][~extra])
        for row in range(4):
            # Find the window in its shard (30 random tokens: one match) and compare label by label.
            window = a["input_ids"][row].numpy()
            hits = [(m, i) for tokens, m in masks.values()
                    for i in np.flatnonzero(tokens[:len(tokens) - 30] == window[0])
                    if np.array_equal(tokens[i:i + 30], window)]
            assert len(hits) == 1
            mask, i = hits[0]
            has_label = (a["labels"][row] != IGNORE_INDEX).numpy()
            assert np.array_equal(extra[row].numpy(), mask[i + 1:i + 31] & has_label)
            dropped += int(extra[row].sum())
            kept += int(has_label.sum()) - int(extra[row].sum())
    assert 0.15 < dropped / (dropped + kept) < 0.45  # about 1/k among labels with full context


def test_validation_pass_stops(data_dir):
    loader = PackedLoader(data_dir, split="val", batch_size=2, seq_len=16, loop=False)
    batches = list(loader)
    assert len(batches) == loader.sources[0].num_windows // 2 > 0


def test_clear_errors(tmp_path, data_dir, mixture):
    with pytest.raises(ValueError, match="too few for one sequence"):
        PackedLoader(data_dir, split="val", batch_size=1, seq_len=100_000)
    with pytest.raises(ValueError, match="rank must"):
        PackedLoader(data_dir, batch_size=1, seq_len=8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="goldfish_k and goldfish_h"):
        PackedLoader(data_dir, batch_size=1, seq_len=8, goldfish_k=50)
    with pytest.raises(ValueError, match="weights must be 2"):
        PackedLoader(mixture, batch_size=1, seq_len=8, weights=[1.0])
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        PackedLoader(tmp_path, batch_size=1, seq_len=8)
    state = PackedLoader(data_dir, batch_size=1, seq_len=8, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(data_dir, batch_size=1, seq_len=8, seed=1).load_state_dict(state)
    pytest.importorskip("tokenizers")
    bpe = tmp_path / "bpe"
    prepare_dataset(random_docs(40, 2), bpe, "bpe:300", val_fraction=0.1)
    with pytest.raises(ValueError, match="different tokenizers"):
        PackedLoader([data_dir, bpe], batch_size=1, seq_len=8)


def test_corrupt_shard_is_named(tmp_path):
    prepare_dataset(random_docs(30, 3), tmp_path, val_fraction=0.1)
    path = split_shards(tmp_path, "train")[0]
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=str(path)):
        PackedLoader(tmp_path, batch_size=1, seq_len=8)
