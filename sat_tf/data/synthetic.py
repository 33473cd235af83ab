"""A synthetic, learnable dataset for smoke runs and tests (``--dataset=synthetic``).

Each class has a fixed random colour (per channel, in [40, 215]); an example is its class
colour plus Gaussian noise (sigma 40 pixels), clipped to [0, 255]. The task is learnable, yet
the pixels look random. Everything derives from ``DataConfig.seed`` and the example index, so
the data is the same on every host and every run.

The global stream of per-replica batches does not depend on how the replicas are spread over
hosts: every input pipeline computes the same stream of per-replica batches of example
*indices* (seeded shuffle of the split, repeated for training), keeps the batches its
replicas receive, and only then generates those batches' images. With R replicas in sync and
k replicas per pipeline, ``distribute_datasets_from_function`` hands a pipeline's consecutive
batches to its replicas in order, so pipeline i keeps the batches whose position modulo R is
in [i*k, i*k + k): at every step global replica r trains on batch ``step * R + r`` of the
stream, whether the replicas are 2 workers x 1 device or 1 process x 2 devices. The eval
split is shared out the same way at batch level (padded batches, with masks): all hosts
together see every example exactly once, and hosts may get unequal numbers of batches (the
last, incomplete round of R batches goes to the first pipelines).
"""
from __future__ import annotations

import tensorflow as tf

from sat_tf.config import DataConfig
from sat_tf.errors import UserError
from sat_tf.data import pipeline

NOISE_STDDEV = 40.0


def _example(index, *, seed: int, split_id: int, size: int, num_classes: int):
    key = tf.stack([tf.cast(seed, tf.int64) * 2 + split_id, tf.cast(index, tf.int64)])
    label = tf.random.stateless_uniform([], key, 0, num_classes, dtype=tf.int32)
    colours = tf.random.stateless_uniform([num_classes, 3], [seed, 7], 40.0, 215.0)
    noise = tf.random.stateless_normal([size, size, 3], key + [0, 1 << 40], stddev=NOISE_STDDEV)
    image = tf.clip_by_value(tf.gather(colours, label)[None, None, :] + noise, 0.0, 255.0)
    return image, label


def _own_batches(indices: tf.data.Dataset, batch_size: int, input_context, *,
                 drop_remainder: bool) -> tf.data.Dataset:
    """The example indices of this pipeline's per-replica batches, in order, unbatched.

    ``indices`` is the whole split's index stream (the same on every host); it is cut into
    per-replica batches and pipeline i of n keeps batch p when ``p mod R`` is in
    [i*k, i*k + k) (R replicas in sync, k = R / n per pipeline): see the module doc.
    """
    batches = indices.batch(batch_size, drop_remainder=drop_remainder)
    if input_context is not None and input_context.num_input_pipelines > 1:
        n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
        replicas = input_context.num_replicas_in_sync
        if replicas % n:
            raise UserError(f"{replicas} replicas cannot be split evenly over {n} input "
                            "pipelines.")
        k = replicas // n
        batches = batches.enumerate().filter(
            lambda p, b: tf.logical_and(p % replicas >= i * k, p % replicas < i * k + k)
        ).map(lambda p, b: b)
    return batches.unbatch()


def build(data: DataConfig, *, split: str, batch_size: int, image_size=None, input_context=None):
    size = image_size or data.synthetic_image_size
    n = data.synthetic_train_examples if split == "train" else data.synthetic_eval_examples
    make = lambda i: _example(i, seed=data.seed, split_id=int(split == "eval"), size=size,
                              num_classes=data.synthetic_num_classes)
    indices = tf.data.Dataset.range(n)
    if split == "train":
        indices = indices.shuffle(min(n, data.shuffle_buffer), seed=data.seed,
                                  reshuffle_each_iteration=True).repeat()
        ds = _own_batches(indices, batch_size, input_context, drop_remainder=True)
        return pipeline.batch_train(ds.map(make, num_parallel_calls=tf.data.AUTOTUNE),
                                    batch_size)
    # Only the split's last batch can be short, and it is the last batch of the pipeline that
    # keeps it, so batch_eval re-forms exactly the batches kept here (padding the short one).
    ds = _own_batches(indices, batch_size, input_context, drop_remainder=False)
    return pipeline.batch_eval(ds.map(make, num_parallel_calls=tf.data.AUTOTUNE), batch_size)
