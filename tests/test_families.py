"""The model-family registry: every family's names, strides and defaults against the models it
builds, one check of a model's arguments shared by configs and build_model, and no TensorFlow
before a model is built."""
import re
import subprocess
import sys
import textwrap

import pytest

from sat_tf import families, models, names
from sat_tf.config import ModelConfig
from sat_tf.errors import UserError


def test_one_object_per_family_registered_under_its_name():
    assert list(families.FAMILIES) == ["resnet", "resnext", "wrn", "efficientnet"]
    assert all(f.name == key for key, f in families.FAMILIES.items())


def _listed_names():
    """The explicit names of MODEL_NAMES_HELP (not the wrn-<depth>-<width> pattern)."""
    return [n for n in names.MODEL_NAMES_HELP.split(", ") if re.fullmatch(r"[a-z]+-[\w-]+", n)]


def test_every_listed_name_parses_to_itself():
    listed = _listed_names()
    assert len(listed) == 6 + 6 + 11         # ResNets, ResNeXts, EfficientNets
    for name in listed:
        family, args = families.parse(name)
        assert family.canonical_name(args) == name


@pytest.mark.parametrize("spelling,canonical,family", [
    ("ResNet50", "resnet-50", "resnet"),
    ("RESNEXT101-32x8d", "resnext-101-32x8d", "resnext"),
    (" wrn34-10", "wrn-34-10", "wrn"),
    ("EfficientNetL1", "efficientnet-l1", "efficientnet"),
])
def test_other_spellings_parse_to_the_canonical_name(spelling, canonical, family):
    parsed, args = names.model(spelling)
    assert parsed == family and names.canonical_name(parsed, args) == canonical


@pytest.mark.parametrize("bad", ["resnext-18-32x4d", "resnet-50-32x4d", "wrn-12-2", "wrn-10-0",
                                 "wrn-4-1", "efficientnet-b9", "efficientnet", "resnet"])
def test_unknown_names_are_user_errors_listing_the_valid_ones(bad):
    with pytest.raises(UserError, match=rf"Unknown model '{bad}'; valid models: resnet-18, "):
        families.parse(bad)


# Truth: each family's total stride is what its built model downsamples by (2x2 pooled maps at
# twice the stride), hard-coded from the architectures: ResNet stem 7x7/2 + pool/2 or 3x3/1,
# then stages /1 /2 /2 /2; WRN stages /1 /2 /2; EfficientNet stem /2 and four /2 rows.
@pytest.mark.parametrize("name,stem,stride", [
    ("resnet-18", "cifar", 8), ("resnet-18", "imagenet", 32), ("wrn-10-1", None, 4),
    ("efficientnet-b0", None, 32)])
def test_total_stride_is_the_built_models(name, stem, stride):
    family, args = families.parse(name)
    assert family.total_stride(args, family.resolve_stem(stem, 2 * stride)) == stride
    model = models.build_model(name, num_classes=2, image_size=2 * stride, stem=stem)
    assert model.get_layer("avg_pool").input.shape[1:3] == (2, 2)
    with pytest.raises(UserError, match=rf"image_size {stride - 1} .* at least {stride}x{stride}"):
        models.resolve(name, image_size=stride - 1, stem=stem)


def test_every_family_builds_at_its_defaults():
    for name in _listed_names() + ["wrn-28-10"]:
        spec = models.resolve(name)           # raises if a default does not fit the model
        family = families.FAMILIES[spec.family]
        assert spec.image_size == family.default_image_size(spec.args, None)
        assert spec.dropout_rate == family.default_dropout_rate(spec.args)
        assert spec.drop_connect_rate == family.default_drop_connect_rate(spec.args)
        assert (spec.drop_connect_rate > 0) == family.stochastic_depth
    assert models.resolve("resnet-50", stem="cifar").image_size == 32
    assert models.resolve("wrn-28-10", stem="cifar").stem is None


# One check of a model's arguments: a config and build_model refuse the same values with the
# same message (a config's num_classes / image_size None is the dataset's, checked later).
@pytest.mark.parametrize("bad", [
    dict(name="resnet-51"), dict(activation="tanh"), dict(num_classes=0),
    dict(num_classes=2.5), dict(image_size=0), dict(image_size=4), dict(image_size=16, stem="imagenet"),
    dict(normalization="caffe"), dict(stem="deep"), dict(name="efficientnet-b0", stem="cifar"),
    dict(name="wrn-28-10", stem="imagenet"), dict(dropout_rate=1.0), dict(drop_connect_rate=0.2),
    dict(name="efficientnet-b0", drop_connect_rate=-0.1), dict(bn_momentum=1.0),
    dict(bn_epsilon=0.0), dict(bn_epsilon=float("inf")), dict(bn_epsilon=True),
])
def test_configs_and_build_model_refuse_alike(bad):
    kwargs = {"name": "resnet-50", "num_classes": 10, **bad}
    with pytest.raises(ValueError) as built:
        models.resolve(**kwargs)
    with pytest.raises(ValueError) as configured:
        ModelConfig(**kwargs).validate()
    assert type(configured.value) is type(built.value)
    assert str(configured.value) == str(built.value)
    assert "\n" not in str(built.value)


def test_a_config_leaves_classes_and_image_size_to_the_dataset():
    ModelConfig(name="efficientnet-b0").validate()
    with pytest.raises(UserError, match="num_classes None"):
        models.resolve("resnet-18", num_classes=None)


def test_registry_and_checks_need_no_tensorflow():
    code = textwrap.dedent("""
        import sys
        from sat_tf import families, names
        from sat_tf.config import ModelConfig
        for name in ("resnet-50", "resnext-50-32x4d", "wrn-28-10", "efficientnet-l1"):
            family, args = families.parse(name)
            family.count_params(args, family.resolve_stem(None, 224), 1000)
            family.activation_elements(args, 224, family.resolve_stem(None, 224), 1000)
        names.check_model("resnet-18", image_size=32, stem="cifar")
        try:
            ModelConfig(name="wrn-28-10", stem="imagenet").validate()
            raise SystemExit("not refused")
        except ValueError as e:
            assert "stem 'imagenet' for wrn-28-10" in str(e), e
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
