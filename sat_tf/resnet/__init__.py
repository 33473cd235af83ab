"""ResNet v1.5, ResNeXt and Wide-ResNet.

``sat_tf.resnet`` (this package, TF-free) is the architecture as data: stage tables, the flat
list of blocks and an exact parameter count. ``sat_tf.resnet.model`` turns it into Keras layers.
Build complete models (input scaling, classifier) with :func:`sat_tf.models.build_model`.
"""
from sat_tf.resnet.architecture import (  # noqa: F401
    RESNET_STAGES, STEM_STRIDE, Block, count_params, resnet_blocks, total_stride, wrn_blocks)
