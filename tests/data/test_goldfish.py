import numpy as np
import pytest
import torch

from fastllm.data import goldfish_mask


def random_tokens(n, vocab=1000, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n)


@pytest.mark.parametrize("k, h", [(2, 1), (4, 13), (50, 50)])
def test_drop_rate_is_one_over_k(k, h):
    n = 200_000
    # A large vocabulary makes (nearly) every window distinct, so the drops are independent draws.
    drop = goldfish_mask(random_tokens(n, vocab=1 << 30), k, h, seed=3)
    assert not drop[:h - 1].any()  # fewer than h tokens of context: never dropped
    rate = drop[h - 1:].mean()
    # Binomial standard deviation sqrt(p (1 - p) / n) is at most 0.0011 here; allow 5 of them.
    assert abs(rate - 1 / k) < 5 * np.sqrt((1 / k) * (1 - 1 / k) / n)


def test_deterministic_and_seeded():
    tokens = random_tokens(5000)
    a = goldfish_mask(tokens, 10, 8, seed=1)
    assert np.array_equal(a, goldfish_mask(tokens.copy(), 10, 8, seed=1))
    assert not np.array_equal(a, goldfish_mask(tokens, 10, 8, seed=2))


def test_same_context_same_decision():
    # A passage repeated at different offsets, in different rows and after different text loses the same
    # tokens wherever its h-token context is inside the passage.
    h, k = 6, 3
    passage = random_tokens(400, seed=7)
    row_a = np.concatenate([random_tokens(37, seed=1), passage])
    row_b = np.concatenate([random_tokens(101, seed=2), passage])
    drop_a = goldfish_mask(row_a, k, h)[37 + h - 1:]
    drop_b = goldfish_mask(row_b, k, h)[101 + h - 1:]
    assert np.array_equal(drop_a, drop_b) and drop_a.any()
    # The decision depends on the whole window: changing a token h-1 back changes some decisions.
    # The decision depends on exactly the h-token window: changing one token can change only the decisions
    # of the h windows that contain it, and does change some of them.
    changed = passage.copy()
    changed[100] += 1
    before, after = goldfish_mask(passage, k, h), goldfish_mask(changed, k, h)
    assert np.array_equal(before[:100], after[:100]) and np.array_equal(before[100 + h:], after[100 + h:])
    assert not np.array_equal(before[100:100 + h], after[100:100 + h])


def test_context_stops_at_document_start():
    h, k = 5, 2
    passage = random_tokens(300, seed=4)
    packed = np.concatenate([random_tokens(50, seed=5), passage])
    doc_ids = np.repeat([0, 1], [50, 300])
    drop = goldfish_mask(packed, k, h, doc_ids=doc_ids)
    assert not drop[50:50 + h - 1].any()  # the second document's first h-1 labels lack full context
    assert np.array_equal(drop[50:], goldfish_mask(passage, k, h))


def test_batched_tensor_input_matches_rows():
    tokens = torch.from_numpy(random_tokens(3 * 257).reshape(3, 257))
    drop = goldfish_mask(tokens, 7, 9, seed=5)
    assert isinstance(drop, torch.Tensor) and drop.dtype == torch.bool and drop.shape == tokens.shape
    for row in range(3):
        assert np.array_equal(drop[row].numpy(), goldfish_mask(tokens[row].numpy(), 7, 9, seed=5))


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must"):
        goldfish_mask(random_tokens(10), 1, 4)
    with pytest.raises(ValueError, match="h \\(context width\\)"):
        goldfish_mask(random_tokens(10), 4, 0)
    with pytest.raises(TypeError, match="integer"):
        goldfish_mask(np.zeros(10), 4, 2)
    with pytest.raises(ValueError, match="doc_ids"):
        goldfish_mask(random_tokens(10), 4, 2, doc_ids=np.zeros(9, dtype=np.int64))
