"""Pieces every input pipeline shares: per-host sharding, batching (exact coverage in eval) and
per-example random keys."""
from __future__ import annotations

from typing import Callable

import tensorflow as tf


def shard(ds: tf.data.Dataset, input_context) -> tf.data.Dataset:
    """This host's 1/num_input_pipelines of ``ds`` (no-op without an input context)."""
    if input_context is None or input_context.num_input_pipelines <= 1:
        return ds
    return ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)


def batch_train(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def batch_eval(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Batches (image, label) pairs into full ``(images, labels, mask)`` batches.

    Every example appears exactly once; the last batch is padded with zero images, label 0 and
    mask 0.0, so every batch has the static shape ``[batch_size, ...]``.
    """
    ds = ds.map(lambda x, y: (x, y, tf.constant(1.0, tf.float32)))
    ds = ds.batch(batch_size, drop_remainder=False)

    def pad(images, labels, mask):
        n = batch_size - tf.shape(labels)[0]
        images = tf.pad(images, [[0, n]] + [[0, 0]] * (len(images.shape) - 1))
        labels = tf.pad(labels, [[0, n]])
        mask = tf.pad(mask, [[0, n]])
        images = tf.ensure_shape(images, [batch_size] + images.shape[1:].as_list())
        return images, tf.ensure_shape(labels, [batch_size]), tf.ensure_shape(mask, [batch_size])

    return ds.map(pad, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def example_key(seed: int, input_context) -> Callable:
    """``index -> [2] int64`` stateless-random key, unique per example and host."""
    n = input_context.num_input_pipelines if input_context is not None else 1
    i = input_context.input_pipeline_id if input_context is not None else 0
    return lambda index: tf.stack([tf.constant(seed, tf.int64), index * n + i])
