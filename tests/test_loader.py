"""Window loader on the bundled corpus: windows are the shard's tokens shifted by one, the order
is deterministic per seed and epoch, ranks are disjoint and together equal one rank's global
batch, a restored state yields exactly the same batches, bad data fails with a clear error."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from amtrain.data.loader import TrainLoader, WindowIndex, check_vocab, val_batches
from amtrain.errors import ShardError, UserError
from amtrain.store import Dataset


def _loader(ds, rank=0, world=1, accum=1, seed=0, micro=4, seq_len=32):
    return TrainLoader(ds, "train", seq_len, micro, accum, rank, world, seed)


def _step_rows(loader) -> torch.Tensor:
    return torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in loader.next_step()])  # (micro*accum, T+1)


def test_windows_are_shard_tokens_shifted_by_one(kjv_gpt2):
    ds = Dataset(kjv_gpt2)
    (x, y), = _loader(ds).next_step()
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    idx = WindowIndex(ds, "train", 32)
    flat = np.concatenate([np.asarray(s) for s in ds.tokens("train")])
    rows = {tuple(flat[i: i + 33]) for i in range(0, flat.size - 33, 32)}
    assert all(tuple(r) in rows for r in torch.cat([x, y[:, -1:]], 1).tolist())
    assert len(idx) == sum((s.size - 1) // 32 for s in ds.tokens("train"))


def test_order_is_deterministic_per_seed(kjv_gpt2):
    ds = Dataset(kjv_gpt2)
    a, b, c = _loader(ds, seed=1), _loader(ds, seed=1), _loader(ds, seed=2)
    for _ in range(3):
        ra, rb, rc = _step_rows(a), _step_rows(b), _step_rows(c)
        assert torch.equal(ra, rb) and not torch.equal(ra, rc)


def test_ranks_are_disjoint_and_union_equals_one_rank_global_batch(kjv_gpt2):
    ds = Dataset(kjv_gpt2)
    single = _loader(ds, world=1, accum=4, micro=2)
    ranks = [_loader(ds, rank=r, world=2, accum=2, micro=2) for r in range(2)]
    for _ in range(5):
        whole = _step_rows(single)
        parts = [_step_rows(r) for r in ranks]
        assert not set(map(tuple, parts[0].tolist())) & set(map(tuple, parts[1].tolist()))
        assert torch.equal(torch.cat(parts), whole)


def test_epoch_visits_every_window_once(kjv_gpt2):
    ds = Dataset(kjv_gpt2)
    loader = _loader(ds, micro=8, seq_len=256)
    n = len(loader.index)
    seen = []
    for _ in range(n // 8):
        seen += [tuple(r) for r in _step_rows(loader).tolist()]
    assert len(set(seen)) == len(seen) == n // 8 * 8
    assert loader.state_dict()["epoch"] == 0
    _step_rows(loader)
    assert loader.state_dict()["epoch"] == 1


def test_restored_state_yields_the_same_batches(kjv_gpt2):
    ds = Dataset(kjv_gpt2)
    a = _loader(ds, rank=1, world=2, seed=5)
    for _ in range(7):
        a.next_step()
    state = a.state_dict()
    b = _loader(ds, rank=1, world=2, seed=5)
    b.load_state_dict(state)
    for _ in range(4):
        assert torch.equal(_step_rows(a), _step_rows(b))
    other_world = _loader(ds, rank=0, world=1, accum=2, seed=5)  # the position is world-size free
    other_world.load_state_dict(a.state_dict())
    c = _loader(ds, rank=0, world=2, seed=5)
    d = _loader(ds, rank=1, world=2, seed=5)
    c.load_state_dict(a.state_dict())
    d.load_state_dict(a.state_dict())
    assert torch.equal(_step_rows(other_world), torch.cat([_step_rows(c), _step_rows(d)]))
    with pytest.raises(UserError, match="train.seed"):
        _loader(ds, seed=6).load_state_dict(state)


def test_val_batches_fixed_and_disjoint(kjv_gpt2):
    ds = Dataset(kjv_gpt2)
    r0 = val_batches(ds, "val", 32, 2, 3, 0, 2)
    r1 = val_batches(ds, "val", 32, 2, 3, 1, 2)
    assert len(r0) == len(r1) == 3
    rows0 = {tuple(x.tolist()[0]) for x, _ in r0}
    assert not rows0 & {tuple(x.tolist()[0]) for x, _ in r1}
    assert all(torch.equal(a[0], b[0]) for a, b in zip(r0, val_batches(ds, "val", 32, 2, 3, 0, 2), strict=True))


def test_data_vocab_larger_than_model_is_an_error(kjv_gpt2):
    ds = Dataset(kjv_gpt2)
    with pytest.raises(UserError, match=r"vocabulary \(50257 ids.*model\.vocab_size = 1000"):
        check_vocab(ds, 1000)
    check_vocab(ds, 50304)


def test_missing_and_corrupt_shards_fail_clearly(kjv_gpt2, tmp_path):
    broken = tmp_path / "ds"
    shutil.copytree(kjv_gpt2, broken)
    shard = broken / Dataset(broken).shards("train")[0].file
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ShardError, match=str(shard.name)):
        _loader(Dataset(broken))
    shard.unlink()
    with pytest.raises(ShardError, match=str(shard.name)):
        Dataset(broken)


def test_too_little_data_for_one_batch(kjv_gpt2):
    with pytest.raises(UserError, match="fewer than one global batch"):
        TrainLoader(Dataset(kjv_gpt2), "val", 4000, 64, 1, 0, 1, 0)
