"""Makes reference_<case>.npz: the logits the SAT authors' own TF1 graph computes from the
stand-in weights of tests/release_reference.py on two real photos. Not run by the tests (it
needs TensorFlow 1 graphs, tensorpack and the authors' code); tests/test_checkpoint_import.py
checks sat-tf's imported models against its output.

How the stored files were made (2026-12-01):

    python -m venv /tmp/satvenv && /tmp/satvenv/bin/pip install tensorflow==2.15.1 \\
        tensorpack==0.11 scikit-learn pillow
    # cihangxie/SmoothAdversarialTraining @ 988c080 in SAT_ROOT, with only what TF 2.15 needs
    # to build its graphs: "import tensorflow.compat.v1 as tf" in ResNet/*.py and
    # ResNet/third_party/*.py; the activations of ResNet/resnet_model.py's activation_list
    # wrapped as lambda x, name=None: tf.nn.<fn>(x) (TF 2.15's tf.nn.swish takes no name);
    # EfficientNet/condconv/ copied from tensorflow/tpu models/official/efficientnet (imported
    # by efficientnet_model.py, absent from the release). No arithmetic was changed.
    TF_ENABLE_ONEDNN_OPTS=1 /tmp/satvenv/bin/python tests/data/sat_release/make_reference.py \\
        --sat_root=SAT_ROOT

The ResNet graph is the authors' eval tower (AdvImageNetModel.build_graph with NoOpAttacker in
a TowerContext with is_training=False: x * 2/255 - 1, NHWC -> NCHW, resnet_backbone); the images
are fed to it as they are (it takes them as BGR). The EfficientNet graph is the authors'
main.model_fn in EVAL mode with the README's flags (--batch_norm_momentum=0.9
--batch_norm_epsilon=1e-5 --sat_preprocessing=True); for b0-ema its
--moving_average_decay=0.9999 restore reads every variable from its /ExponentialMovingAverage
shadow, emulated by loading the shadows' stand-in values into the variables.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))   # tests/: release_reference
import release_reference as rr  # noqa: E402

CASES = {
    "r50-silu": dict(kind="resnet", depth=50, group=1, res2_bottleneck=64, activation="silu",
                     size=128),
    "r50-smoothrelu": dict(kind="resnet", depth=50, group=1, res2_bottleneck=64,
                           activation="smoothrelu", size=128),
    "rx50-32x4d-gelu": dict(kind="resnet", depth=50, group=32, res2_bottleneck=4,
                            activation="gelu", size=128),
    "b0": dict(kind="efficientnet", model_name="efficientnet-b0", ema=False, size=224),
    "b0-ema": dict(kind="efficientnet", model_name="efficientnet-b0", ema=True, size=224),
}
# (scikit-learn sample image, crop box (left, upper, right, lower)), resized with PIL bicubic.
CROPS = (("china.jpg", (106, 0, 533, 427)), ("flower.jpg", (280, 90, 530, 340)))


def photos(size):
    from PIL import Image
    from sklearn.datasets import load_sample_images
    d = load_sample_images()
    by_name = {os.path.basename(f): im for f, im in zip(d.filenames, d.images)}
    return np.stack([np.asarray(Image.fromarray(by_name[n]).crop(box).resize(
        (size, size), Image.BICUBIC), np.uint8) for n, box in CROPS])


def resnet_graph(tf, sat_root, c):
    sys.path.insert(0, os.path.join(sat_root, "ResNet"))
    import nets
    from adv_model import NoOpAttacker
    from tensorpack import TowerContext
    args = argparse.Namespace(depth=c["depth"], group=c["group"], arch="ResNet",
                              res2_bottleneck=c["res2_bottleneck"], activation_name=c["activation"])
    model = nets.ResNetModel(args)
    model.set_attacker(NoOpAttacker())
    model.image_shape = c["size"]
    image, label = model.inputs()
    with TowerContext("", is_training=False):
        model.build_graph(image, label)
    logits = tf.get_default_graph().get_tensor_by_name("linear/output:0")
    return (lambda x: {image: x, label: np.zeros([len(x)], np.int32)}), logits, []


def efficientnet_graph(tf, sat_root, c):
    sys.path.insert(0, os.path.join(sat_root, "EfficientNet"))
    import efficientnet_builder
    import main as effmain
    import utils
    from absl import flags
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main.py", "--model_name=" + c["model_name"],
                 "--moving_average_decay=" + ("0.9999" if c["ema"] else "0"), "--use_tpu=false",
                 "--mode=eval", "--use_bfloat16=false", "--transpose_input=false",
                 "--batch_norm_momentum=0.9", "--batch_norm_epsilon=1e-5",
                 "--sat_preprocessing=True", "--data_format=channels_last",
                 "--num_label_classes=1000"])
    captured, build = {}, efficientnet_builder.build_model

    def keep(*a, **k):
        captured["logits"], endpoints = build(*a, **k)
        return captured["logits"], endpoints
    efficientnet_builder.build_model = keep
    tf.train.get_or_create_global_step()
    x = tf.placeholder(tf.float32, [None, c["size"], c["size"], 3])
    labels = tf.placeholder(tf.float32, [None, 1000])
    effmain.model_fn(x, labels, tf.estimator.ModeKeys.EVAL, {"batch_size": 2,
                                                             "use_bfloat16": False})
    efficientnet_builder.build_model = build
    ema_vars = utils.get_ema_vars() if c["ema"] else []
    return ((lambda images: {x: images.astype(np.float32), labels: np.zeros([len(images), 1000])}),
            captured["logits"], ema_vars)


def run(name, c, sat_root, out):
    import tensorflow.compat.v1 as tf
    tf.disable_v2_behavior()
    images = photos(c["size"])
    graph = tf.Graph()
    with graph.as_default():
        build = resnet_graph if c["kind"] == "resnet" else efficientnet_graph
        feed, logits, ema_vars = build(tf, sat_root, c)
        shadowed = {v.op.name for v in ema_vars}
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            for v in tf.global_variables():
                if v.op.name == "global_step":
                    continue
                # As the EMA restore does: the shadow's value in the variable.
                source = v.op.name + (rr.EMA_SUFFIX if v.op.name in shadowed else "")
                v.load(rr.value(source, v.shape.as_list()), sess)
            result = sess.run(logits, feed(images))
    np.savez_compressed(os.path.join(out, f"reference_{name}.npz"), images=images,
                        logits=result.astype(np.float32))
    print(f"{name}: logits std {result.std():.3f}, max |.| {np.abs(result).max():.3f}, "
          f"argmax {result.argmax(1)}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sat_root", required=True)
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--cases", default=",".join(CASES))
    a = ap.parse_args()
    for name in a.cases.split(","):
        run(name, CASES[name], a.sat_root, a.out)


if __name__ == "__main__":
    main()
