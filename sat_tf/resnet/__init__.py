"""ResNet v1.5, ResNeXt and Wide-ResNet.

``sat_tf.resnet`` (this package, TF-free) is the architecture as data: stage tables and the flat
list of blocks. ``sat_tf.resnet.family`` holds the families' registered objects (names, defaults,
exact counts; :mod:`sat_tf.families`); ``sat_tf.resnet.model`` turns the blocks into Keras layers.
Build complete models (input scaling, classifier) with :func:`sat_tf.models.build_model`.
"""
from sat_tf.resnet.architecture import (  # noqa: F401
    RESNET_STAGES, STEM_STRIDE, Block, resnet_blocks, wrn_blocks)
