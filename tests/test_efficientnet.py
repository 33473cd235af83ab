"""EfficientNet: the pure helpers pinned to known numbers, the exact parameter count against
built models and the reference figures, and the built structure (SE width, stochastic depth,
batch norm, activations everywhere)."""
import keras
import numpy as np
import pytest

from sat_tf import models
from sat_tf.activations import Activation
from sat_tf.efficientnet import (BLOCKS, PARAMS, blocks, decode_block, drop_connect_rates,
                                 encode_block, round_filters, round_repeats, stages)

# Trainable parameters with 1000 classes, measured on the reference builders (DESIGN.md §5),
# B1-B6 as Keras Applications reports them.
REFERENCE_COUNTS = {
    "b0": 5_288_548, "b1": 7_794_184, "b2": 9_109_994, "b3": 12_233_232, "b4": 19_341_616,
    "b5": 30_389_784, "b6": 43_040_704, "b7": 66_347_960, "l1": 272_630_564,
    "l2": 480_309_308,
}


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


# ---- pure helpers ----------------------------------------------------------------------------

@pytest.mark.parametrize("filters,width,expected", [
    (32, 1.0, 32), (32, 1.1, 32), (32, 2.0, 64), (32, 3.9, 128), (32, 4.3, 136),
    (1280, 1.1, 1408), (1280, 2.0, 2560), (1280, 3.9, 4992), (1280, 4.3, 5504),
    (320, 1.4, 448), (40, 1.2, 48),
    (17, 0.7, 16),  # 11.9 rounds down to 8 (< 90 %), so one divisor is added back
    (3, 1.0, 8),    # never below the divisor
])
def test_round_filters(filters, width, expected):
    assert round_filters(filters, width) == expected


@pytest.mark.parametrize("repeats,depth,expected", [
    (1, 1.0, 1), (1, 1.1, 2), (3, 1.0, 3), (4, 3.1, 13), (2, 5.3, 11), (4, 3.7, 15),
])
def test_round_repeats(repeats, depth, expected):
    assert round_repeats(repeats, depth) == expected


def test_decode_block():
    b = decode_block("r2_k5_s22_e6_i24_o40_se0.25")
    assert (b.num_repeat, b.kernel_size, b.strides, b.expand_ratio) == (2, 5, 2, 6)
    assert (b.input_filters, b.output_filters, b.se_ratio, b.id_skip) == (24, 40, 0.25, True)
    assert decode_block("r1_k3_s11_e1_i32_o16_noskip").id_skip is False
    for s in BLOCKS:
        assert encode_block(decode_block(s)) == s
    for bad in ("r1_k3_s12_e1_i32_o16", "r1_k3_e1_i32_o16", "r1_k3_s11_e1_i32_o16_x"):
        with pytest.raises(ValueError, match="block string"):
            decode_block(bad)


def test_params_table():
    assert set(PARAMS) == {f"b{i}" for i in range(9)} | {"l1", "l2"}
    assert (PARAMS["l1"].width, PARAMS["l1"].depth, PARAMS["l1"].image_size,
            PARAMS["l1"].dropout_rate) == (3.9, 3.7, 600, 0.5)
    assert models.default_image_size("efficientnet-b3") == 300
    assert models.default_image_size("efficientnet-l2") == 800


def test_blocks_and_stages():
    assert [len(s) for s in stages("b0")] == [1, 2, 2, 3, 3, 4, 1]
    assert [len(s) for s in stages("b7")] == [4, 7, 7, 10, 10, 13, 4]
    b0 = blocks("b0")
    assert len(b0) == 16
    assert [b.strides for b in b0] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    # A repeat takes the row's output filters as input, stride 1.
    assert (b0[2].input_filters, b0[2].output_filters, b0[2].strides) == (24, 24, 1)
    # SE width comes from the block's input filters, not its expanded filters.
    assert (b0[1].input_filters, b0[1].expanded_filters, b0[1].se_filters) == (16, 96, 4)


def test_drop_connect_rates():
    rates = drop_connect_rates(16)
    assert rates[0] == 0.0
    assert rates[5] == pytest.approx(0.2 * 5 / 16)
    assert rates[-1] == pytest.approx(0.2 * 15 / 16)


# ---- parameter counts ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(REFERENCE_COUNTS))
def test_closed_form_count_equals_reference(variant):
    assert models.count_params(f"efficientnet-{variant}", 1000) == REFERENCE_COUNTS[variant]


@pytest.mark.parametrize("variant,activation,classes", [
    ("b0", "relu", 1000), ("b1", "silu", 10), ("b0", "smooth_relu", 7)])
def test_closed_form_count_equals_built_model(variant, activation, classes):
    model = models.build_model(f"efficientnet-{variant}", activation=activation,
                               num_classes=classes, image_size=32)
    assert _trainable(model) == models.count_params(f"efficientnet-{variant}", classes,
                                                    activation)


def test_built_l1_has_the_reference_count():
    model = models.build_model("efficientnet-l1", activation="silu")
    assert model.input_shape == (None, 600, 600, 3)
    assert _trainable(model) == 272_630_564


# ---- the built structure ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def b0():
    return models.build_model("efficientnet-b0", activation="gelu", num_classes=10,
                              image_size=32, bn_momentum=0.99, bn_epsilon=1e-3)


def test_se_width_and_gate(b0):
    assert b0.get_layer("block1_1_se_reduce").filters == 8       # 32 * 0.25
    assert b0.get_layer("block2_1_se_reduce").filters == 4       # 16 * 0.25, not 96 * 0.25
    assert b0.get_layer("block2_1_se_expand").filters == 96
    assert b0.get_layer("block2_1_se_act").activation == "gelu"  # the activation inside SE
    assert b0.get_layer("block2_1_se_reduce").use_bias
    assert not b0.get_layer("block2_1_expand_conv").use_bias


def test_stochastic_depth_layers_and_rates(b0):
    flat = [(f"block{s + 1}_{i + 1}", b) for s, row in enumerate(stages("b0"))
            for i, b in enumerate(row)]
    rates = drop_connect_rates(len(flat))
    for (name, b), rate in zip(flat, rates):
        names = {layer.name for layer in b0.layers}
        assert (f"{name}_add" in names) == b.has_skip
        if b.has_skip:
            drop = b0.get_layer(f"{name}_drop")
            assert drop.rate == pytest.approx(rate)
            assert tuple(drop.noise_shape) == (None, 1, 1, 1)   # whole examples


def test_stochastic_depth_and_dropout_off_in_inference(b0):
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    a = b0(x, training=False).numpy()
    np.testing.assert_array_equal(a, b0(x, training=False).numpy())
    # ... and on in training (so the check above is not vacuous).
    assert not np.allclose(b0(x, training=True).numpy(), b0(x, training=True).numpy())


def test_batch_norm_settings(b0):
    bns = [l for l in b0.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 1 + sum(2 + (b.expand_ratio != 1) for b in blocks("b0")) + 1
    assert all(l.momentum == 0.99 and l.epsilon == 1e-3 for l in bns)
    sat = models.build_model("efficientnet-b0", num_classes=10, image_size=32)
    assert all(l.momentum == 0.9 and l.epsilon == 1e-5 for l in sat.layers
               if isinstance(l, keras.layers.BatchNormalization))


def test_activation_everywhere(b0):
    acts = [l for l in b0.layers if isinstance(l, Activation)]
    # stem + per block (expand if any, depthwise, SE) + head
    assert len(acts) == 1 + sum(2 + (b.expand_ratio != 1) for b in blocks("b0")) + 1
    assert {l.activation for l in acts} == {"gelu"}
    gates = [l for l in b0.layers if type(l) is keras.layers.Activation]
    assert len(gates) == 16 and all(l.name.endswith("_se_gate") for l in gates)
    for l in b0.layers:
        if isinstance(l, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            assert l.activation is keras.activations.linear, l.name


def test_defaults_from_the_table():
    model = models.build_model("efficientnet-b2", num_classes=3, image_size=32)
    assert model.get_layer("dropout").rate == 0.3
    assert model.get_layer("block6_2_drop").rate == pytest.approx(
        0.2 * (sum(len(s) for s in stages("b2")[:5]) + 1) / len(blocks("b2")))
    no_drop = models.build_model("efficientnet-b0", num_classes=3, image_size=32,
                                 dropout_rate=0.0, drop_connect_rate=0.0)
    assert not any(isinstance(l, keras.layers.Dropout) for l in no_drop.layers)
