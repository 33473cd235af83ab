"""ResNet v1.5 / ResNeXt / Wide-ResNet: exact parameter counts against known figures and built
models, and the v1.5 details (stride on the 3x3, fixed padding, no conv bias, zero last gamma,
initializers, stems, pre-activation WRN)."""
import keras
import numpy as np
import pytest

from sat_tf import models, resnet
from sat_tf.activations import Activation

# Trainable parameters. 1000 classes: torchvision's counts (its convolutions have no bias and
# it projects a shortcut exactly where the shape changes, as here). ResNet-50: DESIGN.md §5.
# 10 classes: the CIFAR ResNet-18 (3x3 stem) and the WideResNet of Zagoruyko & Komodakis
# (WRN-28-10 36.5M in their paper; WRN-34-10 is TRADES' network).
KNOWN_COUNTS = [
    ("resnet-18", 1000, None, 11_689_512),
    ("resnet-34", 1000, None, 21_797_672),
    ("resnet-50", 1000, None, 25_557_032),
    ("resnet-101", 1000, None, 44_549_160),
    ("resnet-152", 1000, None, 60_192_808),
    ("resnext-50-32x4d", 1000, None, 25_028_904),
    ("resnext-101-32x8d", 1000, None, 88_791_336),
    ("resnet-18", 10, 32, 11_173_962),
    ("wrn-28-10", 10, None, 36_479_194),
    ("wrn-34-10", 10, None, 46_160_474),
]


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("name,classes,size,expected", KNOWN_COUNTS)
def test_closed_form_count_equals_known(name, classes, size, expected):
    assert models.count_params(name, classes, image_size=size) == expected


@pytest.mark.parametrize("name,classes,size,activation", [
    ("resnet-18", 1000, None, "relu"),
    ("resnet-50", 1000, None, "silu"),
    ("resnext-50-32x4d", 1000, None, "relu"),
    ("resnet-18", 10, 32, "smooth_relu"),
    ("wrn-16-4", 10, None, "relu"),
    ("wrn-10-2", 100, None, "smooth_relu"),
])
def test_closed_form_count_equals_built_model(name, classes, size, activation):
    # The spatial size does not change the count; build small (same stem) to be quick.
    stem = models.resolve(name, image_size=size).stem
    model = models.build_model(name, activation, classes, image_size=32, stem=stem)
    assert _trainable(model) == models.count_params(name, classes, activation, image_size=size)


def test_built_resnet50_has_the_reference_count(resnet50):
    assert _trainable(resnet50) == 25_557_032


@pytest.fixture(scope="module")
def resnet50():
    return models.build_model("resnet-50", activation="silu")


def test_v1_5_stride_on_3x3_with_fixed_padding(resnet50):
    m = resnet50
    assert m.get_layer("stage2_block1_conv1").strides == (1, 1)
    assert m.get_layer("stage2_block1_conv2").strides == (2, 2)
    assert m.get_layer("stage2_block1_conv2").padding == "valid"
    assert m.get_layer("stage2_block1_conv2_pad").padding == ((1, 1), (1, 1))
    assert m.get_layer("stem_conv_pad").padding == ((3, 3), (3, 3))
    assert m.get_layer("stage2_block1_proj_conv").strides == (2, 2)
    assert m.get_layer("stage1_block2_conv2").padding == "same"
    pool = m.get_layer("stem_pool")
    assert (pool.pool_size, pool.strides, pool.padding) == ((3, 3), (2, 2), "same")
    shapes = [m.get_layer(f"stage{s}_block1_out").output.shape[1] for s in (1, 2, 3, 4)]
    assert shapes == [56, 28, 14, 7]


def test_no_conv_bias_and_zero_last_gamma(resnet50):
    m = resnet50
    convs = [l for l in m.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 53 and not any(l.use_bias for l in convs)
    for b in resnet.resnet_blocks(50):
        n = f"stage{b.stage}_block{b.index}"
        np.testing.assert_array_equal(m.get_layer(f"{n}_bn3").gamma.numpy(), 0.0)
        np.testing.assert_array_equal(m.get_layer(f"{n}_bn1").gamma.numpy(), 1.0)
    np.testing.assert_array_equal(m.get_layer("stage1_block1_proj_bn").gamma.numpy(), 1.0)
    bns = [l for l in m.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert all(l.momentum == 0.9 and l.epsilon == 1e-5 for l in bns)


def test_initializers(resnet50):
    m = resnet50
    # He fan-out, truncated normal (stddev corrected for the truncation at 2 sigma).
    w = m.get_layer("stage4_block1_conv3").kernel.numpy()      # 1x1x512x2048: fan_out 2048
    std = np.sqrt(2.0 / 2048)
    assert np.std(w) == pytest.approx(std, rel=0.02)
    assert np.abs(w).max() <= 2 * std / 0.87962566 + 1e-6
    w = m.get_layer("stage1_block1_conv2").kernel.numpy()      # 3x3x64x64: fan_out 576
    assert np.std(w) == pytest.approx(np.sqrt(2.0 / 576), rel=0.02)
    fc = m.get_layer("logits")
    assert np.std(fc.kernel.numpy()) == pytest.approx(0.01, rel=0.02)
    np.testing.assert_array_equal(fc.bias.numpy(), 0.0)


def test_activation_everywhere_relu_stood(resnet50):
    m = resnet50
    acts = [l for l in m.layers if isinstance(l, Activation)]
    assert len(acts) == 1 + 3 * 16 and {l.activation for l in acts} == {"silu"}
    # After the residual add, and in the stem.
    assert m.get_layer("stage3_block2_out").input is m.get_layer("stage3_block2_add").output
    assert m.get_layer("stem_act").input is m.get_layer("stem_bn").output
    assert not any(type(l) in (keras.layers.Activation, keras.layers.ReLU) for l in m.layers)
    for l in m.layers:
        if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense)):
            assert l.activation is keras.activations.linear


def test_resnext_grouped_convolution():
    m = models.build_model("resnext-50-32x8d", num_classes=10, image_size=32)
    conv = m.get_layer("stage1_block1_conv2")
    assert (conv.groups, conv.filters) == (32, 256)
    assert m.get_layer("stage4_block1_conv2").filters == 2048
    assert m.get_layer("stage4_block3_conv3").filters == 2048
    assert tuple(conv.kernel.shape) == (3, 3, 8, 256)


def test_stems():
    assert models.resolve("resnet-18", image_size=32).stem == "cifar"
    assert models.resolve("resnet-18", image_size=64).stem == "cifar"
    assert models.resolve("resnet-18", image_size=65).stem == "imagenet"
    assert models.resolve("resnet-18").stem == "imagenet"
    assert models.resolve("resnet-18", stem="cifar").image_size == 32
    cifar = models.build_model("resnet-18", num_classes=10, image_size=32)
    conv = cifar.get_layer("stem_conv")
    assert (conv.kernel_size, conv.strides) == ((3, 3), (1, 1))
    names = {l.name for l in cifar.layers}
    assert "stem_pool" not in names and "stem_conv_pad" not in names
    assert cifar.get_layer("stage4_block2_out").output.shape[1:3] == (4, 4)
    # A basic block projects only where the shape changes.
    assert "stage1_block1_proj_conv" not in names and "stage2_block1_proj_conv" in names
    big = models.build_model("resnet-18", num_classes=10, image_size=96, stem="imagenet")
    assert big.get_layer("stem_conv").kernel_size == (7, 7)
    assert big.get_layer("stage4_block2_out").output.shape[1:3] == (3, 3)


def test_wide_resnet_is_pre_activation():
    m = models.build_model("wrn-16-4", activation="elu", num_classes=10)
    assert m.input_shape == (None, 32, 32, 3)
    assert m.get_layer("stem_conv").output.shape[1:] == (32, 32, 16)
    assert "stem_bn" not in {l.name for l in m.layers}
    # Where the width changes, the shortcut convolves the pre-activated input ...
    assert m.get_layer("stage1_block1_proj_conv").input is m.get_layer(
        "stage1_block1_act1").output
    assert m.get_layer("stage2_block1_proj_conv").strides == (2, 2)
    assert m.get_layer("stage2_block1_conv1").output.shape[1:] == (16, 16, 128)
    # ... otherwise it is the identity of the raw block input.
    add = m.get_layer("stage1_block2_add")
    assert add.input[0] is m.get_layer("stage1_block1_add").output
    assert m.get_layer("final_act").input is m.get_layer("final_bn").output
    assert m.get_layer("avg_pool").input is m.get_layer("final_act").output
    acts = [l for l in m.layers if isinstance(l, Activation)]
    assert len(acts) == 2 * 6 + 1 and {l.activation for l in acts} == {"elu"}
    convs = [l for l in m.layers if isinstance(l, keras.layers.Conv2D)]
    assert not any(l.use_bias for l in convs)


def test_blocks_data():
    b = resnet.resnet_blocks(50)
    assert len(b) == 16 and [x.stride for x in b if x.stride > 1] == [2, 2, 2]
    assert sum(x.projection for x in b) == 4
    assert len(resnet.resnet_blocks(200)) == 66
    assert len(resnet.wrn_blocks(34, 10)) == 15
    with pytest.raises(ValueError, match="basic blocks"):
        resnet.resnet_blocks(18, cardinality=32, bottleneck_width=4)
