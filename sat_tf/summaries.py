"""TensorBoard summaries, written with TensorFlow's own ``tf.summary.write`` and the metadata of
TensorBoard's scalar and image plugins, so the tensorboard package is needed only to view them.
"""
from __future__ import annotations

import os

import tensorflow as tf
from tensorflow.core.framework import summary_pb2


def writer(model_dir: str, name: str, *, is_chief: bool = True):
    """A writer of ``model_dir/name`` (e.g. "train", "eval"); a no-op writer on the other
    workers of a multi-worker run, which must not write the chief's files."""
    if not is_chief:
        return tf.summary.create_noop_writer()
    return tf.summary.create_file_writer(os.path.join(model_dir, name))


def scalar(name: str, value) -> None:
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR)
    tf.summary.write(name, tf.cast(value, tf.float32), metadata=metadata)


def images(name: str, pixels) -> None:
    """``pixels``: [n, H, W, 3] in [0, 255]."""
    pixels = tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8)
    height, width = pixels.shape[1], pixels.shape[2]
    encoded = tf.map_fn(tf.image.encode_png, pixels, fn_output_signature=tf.string)
    tensor = tf.concat([tf.constant([str(width), str(height)]), encoded], axis=0)
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="images"),
        data_class=summary_pb2.DATA_CLASS_BLOB_SEQUENCE)
    tf.summary.write(name, tensor, metadata=metadata)
