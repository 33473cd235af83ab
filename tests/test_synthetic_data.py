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


def test_host_shards_are_disjoint_and_complete():
    cfg = DataConfig(synthetic_eval_examples=30, synthetic_image_size=4)
    whole, labels, _ = collect(data.build_dataset(cfg, split="eval", batch_size=7))
    parts = []
    for host in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=host,
                                         num_replicas_in_sync=2)
        x, y, m = collect(data.build_dataset(cfg, split="eval", batch_size=4, input_context=ctx))
        parts.append(x[m == 1])
    assert sum(len(p) for p in parts) == 30
    key = lambda arr: sorted(map(bytes, arr.reshape(len(arr), -1)))
    assert key(np.concatenate(parts)) == key(whole[:30])


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
