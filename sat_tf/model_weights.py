"""Which of a model's variables play which part in training, selected by layer type (never by
variable-name matching, DESIGN.md §7): the weights weight decay applies to, the batch-norm
moving statistics, and the states of the model's random generators."""
from __future__ import annotations

import keras

_KERNEL_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                  keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D, keras.layers.Dense)


def _layers(model: keras.Model) -> list:
    return model._flatten_layers(include_self=False, recursive=True)


def decayed_weights(model: keras.Model, scope: str = "non_bn") -> list:
    """The weights weight decay applies to, selected by layer type.

    ``scope="kernels"``: the kernels of convolution and dense layers (the SAT release's
    ResNet decays tensorpack's ``.*/W``: no biases, no batch norm, no SmoothReLU beta);
    ``"non_bn"``: every trainable weight of a layer that is not batch normalization (the TPU
    EfficientNet code). Other scopes are refused by ``OptimizerConfig.validate``.
    """
    if scope == "kernels":
        kernels = {id(w) for layer in _layers(model) if isinstance(layer, _KERNEL_LAYERS)
                   for w in (getattr(layer, name, None) for name in
                             ("kernel", "depthwise_kernel", "pointwise_kernel"))
                   if w is not None}
        return [w for w in model.trainable_weights if id(w) in kernels]
    bn = {id(w) for layer in _layers(model)
          if isinstance(layer, keras.layers.BatchNormalization) for w in layer.weights}
    return [w for w in model.trainable_weights if id(w) not in bn]


def batch_norm_statistics(model: keras.Model) -> list:
    """The moving mean / variance (non-trainable weights) of every batch-norm layer."""
    return [w for layer in _layers(model) if isinstance(layer, keras.layers.BatchNormalization)
            for w in layer.non_trainable_weights]


def random_generator_states(model: keras.Model) -> list:
    """The states of the model's random generators (dropout, stochastic depth): variables
    that are not weights, which ``tf.train.Checkpoint(model=)`` leaves out."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]
