"""Test session set-up: quiet TensorFlow, and split the CPU into logical devices.

The split must happen before TensorFlow initialises its devices, so it is done here, at
import time, once for the whole session. Tests that need a multi-replica strategy use
``tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])``.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 2

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS)
