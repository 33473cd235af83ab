"""SavedModel export of a trained model, usable with nothing but TensorFlow.

Signatures (``saved_model_cli show --dir EXPORT --all`` lists them):

* ``serving_default``: ``images`` float32 [batch, H, W, 3] pixels in [0, 255] ->
  ``logits`` float32 [batch, classes], ``probabilities`` (softmax), ``classes`` int32 (argmax).
  Differentiable with respect to ``images``, so attacks run against the loaded model.
* ``serving_encoded``: ``image_bytes`` string [batch] of encoded JPEG / PNG / BMP / GIF
  images -> the same outputs, with the evaluation preprocessing inside the graph (decode to
  RGB, centre crop of size/(size+32) of the short side, bicubic resize, clip to [0, 255]).
* ``metadata``: no inputs -> ``json``, the export metadata (model, activation, image size,
  classes, preprocessing, training step, weights).

The metadata is also written as the asset ``assets/sat_tf_export.json``.
"""
from __future__ import annotations

import datetime
import json
import os
import tempfile

import keras
import tensorflow as tf

from sat_tf.data import imagenet

SERVING_SIGNATURE = "serving_default"
ENCODED_SIGNATURE = "serving_encoded"
METADATA_SIGNATURE = "metadata"
METADATA_ASSET = "sat_tf_export.json"
PREPROCESSING = {
    SERVING_SIGNATURE: "float32 RGB pixels in [0, 255], NHWC, already at the model's size",
    ENCODED_SIGNATURE: ("decode JPEG/PNG/BMP/GIF to RGB; centre crop size/(size+"
                        f"{imagenet.CROP_PADDING}) of the short side; bicubic resize to size x "
                        "size; clip to [0, 255] (sat_tf.data.imagenet's evaluation preprocessing)"),
}


def decode_and_preprocess(image_bytes, image_size: int):
    """Encoded image bytes (a scalar string) -> float32 [size, size, 3] pixels in [0, 255].

    JPEGs take exactly the evaluation pipeline's path (``imagenet.preprocess_eval``); other
    formats are decoded whole, then cropped with the same window and resized the same way.
    """
    def other_formats():
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        y, x, h, w = tf.unstack(imagenet.center_crop_window(tf.shape(image), image_size))
        image = tf.cast(tf.image.crop_to_bounding_box(image, y, x, h, w), tf.float32)
        return tf.clip_by_value(
            tf.image.resize(image, [image_size, image_size], method="bicubic"), 0.0, 255.0)

    image = tf.cond(tf.io.is_jpeg(image_bytes),
                    lambda: imagenet.preprocess_eval(image_bytes, image_size), other_formats)
    return tf.ensure_shape(image, [image_size, image_size, 3])


class _Serving(tf.Module):
    """The exported object: the model's variables and the signature functions."""

    def __init__(self, model: keras.Model, image_size: int, metadata_json: str, asset_path: str):
        super().__init__(name="sat_tf_serving")
        # Track the backing tf.Variables: tracking the Keras model (or its KerasVariables)
        # saves variables that TF1-style loaders (saved_model_cli run, TF Serving) cannot find.
        self.model_variables = [v.value for v in model.variables]
        self.metadata_asset = tf.saved_model.Asset(asset_path)
        self._metadata_json = metadata_json
        size = int(image_size)

        def outputs(images):
            # Signatures do not enforce their static shape when called: check it in the graph.
            images = tf.ensure_shape(images, [None, size, size, 3])
            logits = tf.cast(model(images, training=False), tf.float32)
            return {"logits": logits, "probabilities": tf.nn.softmax(logits),
                    "classes": tf.argmax(logits, axis=-1, output_type=tf.int32)}

        self.serve = tf.function(
            outputs, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, "images")])

        def serve_encoded(image_bytes):
            images = tf.map_fn(lambda b: decode_and_preprocess(b, size), image_bytes,
                               fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
            return outputs(images)

        self.serve_encoded = tf.function(
            serve_encoded, input_signature=[tf.TensorSpec([None], tf.string, "image_bytes")])
        self.metadata = tf.function(lambda: {"json": tf.constant(self._metadata_json)},
                                    input_signature=[])


def export_saved_model(model: keras.Model, export_dir: str, *, metadata: dict | None = None,
                       image_size: int | None = None) -> str:
    """Writes ``model`` (pixels -> logits) as a SavedModel in ``export_dir``.

    Args:
      model: a Keras model taking float32 [batch, size, size, 3] pixels in [0, 255]. Give the
        weights to export (EMA weights already swapped in by ``training.load_model``).
      export_dir: a new or empty folder (local or gs://).
      metadata: facts to record (model name, activation, training step, weights, ...); the
        image size, class count and preprocessing are added.
      image_size: defaults to the model's static input size.

    Returns:
      export_dir.
    """
    shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else ()
    if image_size is None:
        if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3:
            raise ValueError(f"Cannot read the image size from model input shape {shape}; pass "
                             "image_size.")
        image_size = int(shape[1])
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"Invalid image_size {image_size!r}; it must be a positive integer.")
    if tf.io.gfile.exists(export_dir) and tf.io.gfile.listdir(export_dir):
        raise ValueError(f"Export folder {export_dir!r} exists and is not empty; choose a new "
                         "one.")
    num_classes = int(model.outputs[0].shape[-1]) if getattr(model, "outputs", None) else None
    meta = dict(metadata or {})
    meta.update({
        "format": "sat_tf.export/1",
        "image_size": image_size,
        "num_classes": num_classes,
        "input": "float32 RGB pixels in [0, 255], NHWC (the model scales them itself)",
        "preprocessing": PREPROCESSING,
        "signatures": {SERVING_SIGNATURE: "images -> logits, probabilities, classes",
                       ENCODED_SIGNATURE: "image_bytes -> logits, probabilities, classes",
                       METADATA_SIGNATURE: "() -> json"},
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    })
    text = json.dumps(meta, indent=2, sort_keys=True)
    with tempfile.TemporaryDirectory() as tmp:
        asset = os.path.join(tmp, METADATA_ASSET)
        with open(asset, "w") as f:
            f.write(text + "\n")
        module = _Serving(model, image_size, text, asset)
        tf.saved_model.save(module, export_dir, signatures={
            SERVING_SIGNATURE: module.serve.get_concrete_function(),
            ENCODED_SIGNATURE: module.serve_encoded.get_concrete_function(),
            METADATA_SIGNATURE: module.metadata.get_concrete_function(),
        })
    return export_dir


class ServingModel:
    """A loaded export as a callable ``images -> logits`` (pure TensorFlow, no model code).

    Checks the input dtype and shape with a one-line error; differentiable, so
    ``attacks.pgd`` and ``evaluation.evaluate`` accept it in place of the Keras model.
    """

    def __init__(self, export_dir: str):
        if not tf.io.gfile.exists(os.path.join(export_dir, "saved_model.pb")):
            raise ValueError(f"No SavedModel in {export_dir!r} (saved_model.pb not found).")
        self.export_dir = export_dir
        self.loaded = tf.saved_model.load(export_dir)
        missing = {SERVING_SIGNATURE, METADATA_SIGNATURE} - set(self.loaded.signatures)
        if missing:
            raise ValueError(f"{export_dir!r} is not a sat_tf export (missing signatures "
                             f"{sorted(missing)}).")
        self._serve = self.loaded.signatures[SERVING_SIGNATURE]
        self.metadata = json.loads(
            self.loaded.signatures[METADATA_SIGNATURE]()["json"].numpy().decode())
        self.image_size = int(self.metadata["image_size"])
        self.num_classes = self.metadata.get("num_classes")
        self.output_shape = (None, self.num_classes)

    def __call__(self, images):
        images = tf.convert_to_tensor(images)
        expected = [self.image_size, self.image_size, 3]
        if images.dtype != tf.float32:
            raise ValueError(f"Invalid input dtype {images.dtype.name}; the SavedModel expects "
                             f"float32 pixels [batch, {', '.join(map(str, expected))}].")
        if images.shape.rank != 4 or images.shape[1:].as_list() != expected:
            raise ValueError(f"Invalid input shape {images.shape.as_list()}; the SavedModel "
                             f"expects [batch, {', '.join(map(str, expected))}].")
        return self._serve(images=images)["logits"]


def load(export_dir: str) -> ServingModel:
    """Loads an export written by :func:`export_saved_model`."""
    return ServingModel(export_dir)
