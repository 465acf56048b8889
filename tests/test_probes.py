"""The frozen-feature probes in blocks and mini-batches against the plain computation on the whole matrices."""
import pytest
import torch
import torch.nn.functional as F

from ddmim.probes import knn_predict, linear_probe, nearest, standardiser


def _clusters(rows: int, classes: int = 5, dim: int = 32, spread: float = 0.6, seed: int = 0):
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))  # the same for every split
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(classes, (rows,), generator=g)
    return centres[labels] + spread * torch.randn(rows, dim, generator=g), labels


def test_blocked_nearest_rows_equal_the_whole_similarity_matrix():
    train, _ = _clusters(3000)
    test, _ = _clusters(500, seed=1)
    sims, rows = nearest(train, test, k=7, test_block=64, train_block=256)
    plain_sims, plain_rows = (F.normalize(test, dim=1) @ F.normalize(train, dim=1).T).topk(7, dim=1)
    assert torch.equal(rows, plain_rows)
    torch.testing.assert_close(sims, plain_sims, rtol=0, atol=1e-6)
    # the answers come from many train blocks, so the running merge of blocks is what is tested
    assert len(torch.unique(rows // 256)) == 12


def test_blocked_knn_votes_equal_unblocked_ones_and_k_above_the_rows_is_capped():
    train, train_y = _clusters(2000)
    test, _ = _clusters(300, seed=2)
    whole = knn_predict(train, train_y, test, 5, k=20, test_block=10**6, train_block=10**6)
    assert torch.equal(knn_predict(train, train_y, test, 5, k=20, test_block=37, train_block=111), whole)
    few = knn_predict(train[:3], train_y[:3], test, 5, k=20)
    assert set(few.tolist()) <= set(train_y[:3].tolist())


def test_bfloat16_features_give_nearly_the_same_neighbours_in_half_the_memory():
    train, train_y = _clusters(2000, spread=0.3)
    test, _ = _clusters(400, spread=0.3, seed=3)
    exact = knn_predict(train, train_y, test, 5)
    half = knn_predict(train.bfloat16(), train_y, test, 5)
    assert (half == exact).float().mean() > 0.99


def test_the_standardiser_matches_torch_mean_and_std():
    train, _ = _clusters(5000)
    train = train * 3 + 10  # an offset that a one-pass float32 variance would lose digits to
    mean, std = standardiser(train, block=999)
    torch.testing.assert_close(mean, train.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, train.std(0) + 1e-6, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [256, 10**6])
def test_the_mini_batch_linear_probe_learns_labels_and_not_noise(batch):
    train, train_y = _clusters(2000, spread=1.5)
    val, val_y = _clusters(500, spread=1.5, seed=4)
    learned = linear_probe(train, train_y, val, val_y, 5, epochs=20, batch=batch)
    shuffled = linear_probe(train, train_y[torch.randperm(2000)], val, val_y, 5, epochs=20, batch=batch)
    assert learned > 90 and shuffled < 40, (learned, shuffled)
