"""The synthetic dataset and the shared eval batching: the data contract of sat_tf.data."""
import numpy as np
import pytest
import tensorflow as tf

from sat_tf import data
from sat_tf.config import DataConfig


def collect(ds):
    xs, ys, ms = [], [], []
    for x, y, m in ds:
        xs.append(x.numpy()), ys.append(y.numpy()), ms.append(m.numpy())
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ms)


def test_eval_covers_every_example_once_with_padding():
    cfg = DataConfig(synthetic_eval_examples=23, synthetic_image_size=8)
    ds = data.build_dataset(cfg, split="eval", batch_size=5)
    for x, y, m in ds:
        assert x.shape == (5, 8, 8, 3) and x.dtype == tf.float32
        assert y.dtype == tf.int32 and m.dtype == tf.float32
    x, y, m = collect(ds)
    assert len(m) == 25 and m.sum() == 23 and np.all(m[:23] == 1) and np.all(m[23:] == 0)
    assert x.min() >= 0 and x.max() <= 255
    assert set(np.unique(y[:23])) <= set(range(10))
    # Deterministic: a second pass is identical.
    x2, y2, _ = collect(ds)
    np.testing.assert_array_equal(x, x2)


def _batches(cfg, split, batch_size, pipeline, pipelines, replicas, count=None):
    """Pipeline ``pipeline``'s per-replica batches (as numpy tuples), at most ``count``."""
    ctx = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=pipeline,
                                     num_replicas_in_sync=replicas)
    ds = data.build_dataset(cfg, split=split, batch_size=batch_size, input_context=ctx)
    if count is not None:
        ds = ds.take(count)
    return [tuple(t.numpy() for t in batch) for batch in ds]


def _global_batches(cfg, split, batch_size, pipelines, replicas, steps):
    """What global replica r receives at step j, ``[j][r]``, when each pipeline's consecutive
    batches go to its k = replicas / pipelines replicas in order, as
    ``distribute_datasets_from_function`` hands them out."""
    k = replicas // pipelines
    streams = [_batches(cfg, split, batch_size, i, pipelines, replicas, steps * k)
               for i in range(pipelines)]
    return [[streams[r // k][j * k + r % k] for r in range(replicas)] for j in range(steps)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        for batch_a, batch_b in zip(step_a, step_b):
            for x, y in zip(batch_a, batch_b):
                np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("pipelines, replicas", [(2, 2), (2, 4), (3, 6)])
def test_host_shards_are_disjoint_and_complete(pipelines, replicas):
    """Every eval example on exactly one host, in batches identical to the unsharded run's
    (the last one padded); hosts may get unequal batch counts (30 examples / 4 = 8 batches)."""
    cfg = DataConfig(synthetic_eval_examples=30, synthetic_image_size=4)
    whole = collect(data.build_dataset(cfg, split="eval", batch_size=4))
    parts = [_batches(cfg, "eval", 4, i, pipelines, replicas) for i in range(pipelines)]
    counts = [len(p) for p in parts]
    assert sum(counts) == 8
    if pipelines == 3:
        assert counts == [4, 2, 2]    # batches 0,1,6,7 | 2,3 | 4,5
    xs, ys, ms = (np.concatenate([b[t] for p in parts for b in p]) for t in range(3))
    assert ms.sum() == 30
    key = lambda x, y: sorted(zip(map(bytes, x.reshape(len(x), -1)), y.tolist()))
    assert key(xs[ms == 1], ys[ms == 1]) == key(whole[0][:30], whole[1][:30])


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("pipelines, replicas", [(2, 2), (2, 4), (4, 4)])
def test_global_batches_do_not_depend_on_the_host_layout(split, pipelines, replicas):
    """Global replica r gets the same examples at every step whether the replicas sit on
    several hosts (``pipelines`` input pipelines) or on one (a single pipeline)."""
    cfg = DataConfig(synthetic_eval_examples=64, synthetic_train_examples=40,
                     synthetic_image_size=4, shuffle_buffer=16)
    steps = 7 if split == "train" else 2     # train: across an epoch boundary (40 / 4 / 2)
    one_host = _global_batches(cfg, split, 4, 1, replicas, steps)
    _assert_same(_global_batches(cfg, split, 4, pipelines, replicas, steps), one_host)
    # Replica r's batch at step j is batch j * R + r of the one unsharded stream.
    alone = _batches(cfg, split, 4, 0, 1, 1, steps * replicas)
    _assert_same(one_host, [[alone[j * replicas + r] for r in range(replicas)]
                            for j in range(steps)])


def test_mirrored_strategy_hands_consecutive_batches_to_its_replicas():
    """The hand-out order the sharding above relies on: one pipeline, two replicas."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    cfg = DataConfig(synthetic_image_size=4)
    dist = strategy.distribute_datasets_from_function(
        lambda ctx: data.build_dataset(cfg, split="train", batch_size=3, input_context=ctx))
    got = []
    for _, (x, y) in zip(range(3), dist):
        got.append([(a.numpy(), b.numpy()) for a, b in zip(
            strategy.experimental_local_results(x), strategy.experimental_local_results(y))])
    _assert_same(got, _global_batches(cfg, "train", 3, 2, 2, 3))


def test_train_is_seeded_batched_and_learnable():
    cfg = DataConfig(synthetic_image_size=8)
    a = next(iter(data.build_dataset(cfg, split="train", batch_size=16)))
    b = next(iter(data.build_dataset(cfg, split="train", batch_size=16)))
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    assert len(a) == 2 and a[0].shape == (16, 8, 8, 3)
    # Learnable: the mean colour of an image predicts its class (nearest class mean).
    x, y, m = collect(data.build_dataset(DataConfig(synthetic_image_size=8,
                                                    synthetic_eval_examples=400),
                                         split="eval", batch_size=100))
    means = x.mean(axis=(1, 2))
    centres = np.stack([means[y == c].mean(0) for c in range(10)])
    pred = np.argmin(((means[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert np.mean(pred == y) > 0.9


def test_bad_split_and_batch_size():
    with pytest.raises(ValueError, match="valid choices: train, eval"):
        data.build_dataset(DataConfig(), split="validation", batch_size=4)
    with pytest.raises(ValueError, match="batch size 0"):
        data.build_dataset(DataConfig(), split="train", batch_size=0)
