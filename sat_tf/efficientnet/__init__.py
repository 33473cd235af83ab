"""EfficientNet B0-B8, L1, L2.

``sat_tf.efficientnet`` (this package, TF-free) is the architecture as data: block strings, the
scaling table, ``round_filters`` / ``round_repeats``. ``sat_tf.efficientnet.family`` holds the
family's registered object (names, defaults, exact counts; :mod:`sat_tf.families`);
``sat_tf.efficientnet.model`` turns the blocks into Keras layers. Build complete models (input
scaling, classifier) with :func:`sat_tf.models.build_model`.
"""
from sat_tf.efficientnet.architecture import (  # noqa: F401
    BLOCKS, DROP_CONNECT_RATE, PARAMS, TOTAL_STRIDE, BlockArgs, Params, blocks, decode_block,
    drop_connect_rates, encode_block, round_filters, round_repeats, stages)
