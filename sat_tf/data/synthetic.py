"""A synthetic, learnable dataset for smoke runs and tests (``--dataset=synthetic``).

Each class has a fixed random colour (per channel, in [40, 215]); an example is its class
colour plus Gaussian noise (sigma 40 pixels), clipped to [0, 255]. The task is learnable, yet
the pixels look random. Everything derives from ``DataConfig.seed`` and the example index, so
the data is the same on every host and every run.
"""
from __future__ import annotations

import tensorflow as tf

from sat_tf.config import DataConfig
from sat_tf.data import pipeline

NOISE_STDDEV = 40.0


def _example(index, *, seed: int, split_id: int, size: int, num_classes: int):
    key = tf.stack([tf.cast(seed, tf.int64) * 2 + split_id, tf.cast(index, tf.int64)])
    label = tf.random.stateless_uniform([], key, 0, num_classes, dtype=tf.int32)
    colours = tf.random.stateless_uniform([num_classes, 3], [seed, 7], 40.0, 215.0)
    noise = tf.random.stateless_normal([size, size, 3], key + [0, 1 << 40], stddev=NOISE_STDDEV)
    image = tf.clip_by_value(tf.gather(colours, label)[None, None, :] + noise, 0.0, 255.0)
    return image, label


def build(data: DataConfig, *, split: str, batch_size: int, image_size=None, input_context=None):
    size = image_size or data.synthetic_image_size
    n = data.synthetic_train_examples if split == "train" else data.synthetic_eval_examples
    make = lambda i: _example(i, seed=data.seed, split_id=int(split == "eval"), size=size,
                              num_classes=data.synthetic_num_classes)
    ds = pipeline.shard(tf.data.Dataset.range(n), input_context)
    if split == "train":
        ds = ds.shuffle(min(n, data.shuffle_buffer), seed=data.seed, reshuffle_each_iteration=True)
        ds = ds.repeat().map(make, num_parallel_calls=tf.data.AUTOTUNE)
        return pipeline.batch_train(ds, batch_size)
    return pipeline.batch_eval(ds.map(make, num_parallel_calls=tf.data.AUTOTUNE), batch_size)
