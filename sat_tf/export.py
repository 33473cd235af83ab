"""SavedModel export of a trained model, usable with nothing but TensorFlow.

Signatures (``saved_model_cli show --dir EXPORT --all`` lists them):

* ``serving_default``: ``images`` float32 [batch, H, W, 3] pixels in [0, 255] ->
  ``logits`` float32 [batch, classes], ``probabilities`` (softmax), ``classes`` int32 (argmax).
  Differentiable with respect to ``images``, so attacks run against the loaded model. NaN or
  infinite pixels fail with an ``InvalidArgumentError`` (they would give NaN logits silently);
  finite values outside [0, 255] go to the model unchanged, exactly as the Keras model takes
  them (``plots.loss_landscape`` evaluates the model up to ``radius`` pixels beyond the image,
  so clipping would bend its landscapes and rejecting would stop it). A batch of 0 images gives
  logits of shape [0, classes] (with oneDNN's kernels the model itself fails on one).
* ``serving_encoded``: ``image_bytes`` string [batch] of encoded JPEG / PNG images -> the same
  outputs, with the evaluation preprocessing inside the graph (decode to RGB, centre crop of
  size/(size+32) of the short side, bicubic resize, clip to [0, 255]). The size is read from
  the image header before decoding: an image of more than ``max_encoded_pixels`` (width x
  height, default :data:`MAX_ENCODED_PIXELS`) fails with an ``InvalidArgumentError`` without
  being decoded. A 47 KiB PNG can declare 20000 x 20000 pixels, 1.2 GB decoded. Other formats
  (GIF, BMP) are refused: a GIF's memory depends on frame headers all through the file.
* ``metadata``: no inputs -> ``json``, the export metadata (model, activation, image size,
  classes, preprocessing, input checks, training step, weights).

The metadata is also written as the asset ``assets/sat_tf_export.json``.

The export is written to a hidden sibling folder and renamed into place when complete, so a
failed write (disk full, quota, permissions) leaves no partial export and any previous export
intact.

:func:`export_saved_model` exports any Keras model; :func:`export_run` a training run (what
``run/export.py`` does), recording where it came from (:func:`run_metadata`) and serving the
run's own evaluation preprocessing (:func:`run_preprocessing`).
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import os
import re
import uuid

import keras
import tensorflow as tf

from sat_tf import data, loading
from sat_tf.config import Experiment
from sat_tf.data import imagenet
from sat_tf.errors import UserError

SERVING_SIGNATURE = "serving_default"
ENCODED_SIGNATURE = "serving_encoded"
METADATA_SIGNATURE = "metadata"
METADATA_ASSET = "sat_tf_export.json"
# 16.7 Mpixel: a 16-megapixel camera photo (4920 x 3264) fits. At the bound one image takes
# ~50 MB decoded (uint8 RGB) plus up to ~200 MB for its float32 crop (size/(size+32) of the
# short side), ~53 MB in all at 16x16 (measured); the 20000 x 20000 PNG it refuses, 1.2 GB.
MAX_ENCODED_PIXELS = 4096 * 4096
ENCODED_FORMATS = ("JPEG", "PNG")
PIXELS_ERROR = "pixels must be finite values in [0, 255]"
_SERVING_INPUT = ("float32 RGB pixels in [0, 255], NHWC, already at the model's size: "
                  "preprocess them as serving_encoded does (the run's evaluation "
                  "preprocessing)")
_ENCODED = {   # the run's data.preprocessing -> what serving_encoded does
    "imagenet": ("decode JPEG/PNG to RGB; centre crop size/(size+"
                 f"{imagenet.CROP_PADDING}) of the short side; bicubic resize to size x size; "
                 "clip to [0, 255] (sat_tf.data.imagenet's evaluation preprocessing)"),
    "whole": ("decode JPEG/PNG to RGB; bicubic resize of the whole image to size x size; clip "
              "to [0, 255] (the evaluation preprocessing of runs with preprocessing "
              "'resize' or 'cifar')"),
}


def preprocessing_text(preprocessing: str = "imagenet") -> dict:
    """What each signature expects, for the export's metadata."""
    return {SERVING_SIGNATURE: _SERVING_INPUT,
            ENCODED_SIGNATURE: _ENCODED["imagenet" if preprocessing == "imagenet" else "whole"]}


PREPROCESSING = preprocessing_text()
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BIG_ENDIAN = (1 << 24, 1 << 16, 1 << 8, 1)


def encoded_image_size(image_bytes):
    """``[height, width]`` int64 of a JPEG or PNG from its header alone; ``[-1, -1]`` otherwise.

    JPEG: ``tf.image.extract_jpeg_shape`` (reads the markers up to the frame header). PNG: the
    IHDR chunk, which the format requires first: bytes 16..24 hold width and height as
    big-endian uint32.
    """
    head = tf.io.decode_raw(tf.strings.substr(image_bytes, 0, 24) + b"\0" * 24, tf.uint8)[:24]
    head = tf.cast(head, tf.int64)
    is_png = tf.logical_and(
        tf.reduce_all(tf.equal(head[:8], tf.constant(list(_PNG_SIGNATURE), tf.int64))),
        tf.reduce_all(tf.equal(head[12:16], tf.constant(list(b"IHDR"), tf.int64))))
    big_endian = tf.constant(_BIG_ENDIAN, tf.int64)
    png_size = tf.stack([tf.reduce_sum(head[20:24] * big_endian),
                         tf.reduce_sum(head[16:20] * big_endian)])
    return tf.cond(tf.io.is_jpeg(image_bytes),
                   lambda: tf.cast(tf.image.extract_jpeg_shape(image_bytes)[:2], tf.int64),
                   lambda: tf.where(is_png, png_size, tf.constant([-1, -1], tf.int64)))


def check_encoded_image(image_bytes, max_pixels: int = MAX_ENCODED_PIXELS):
    """Fails (``InvalidArgumentError``) unless ``image_bytes`` is a JPEG or PNG of at most
    ``max_pixels`` pixels; reads only the header. Returns ``image_bytes``, after the check."""
    size = encoded_image_size(image_bytes)
    height, width = size[0], size[1]
    supported = tf.debugging.Assert(
        height >= 0, [f"{ENCODED_SIGNATURE} accepts JPEG and PNG images only."])
    with tf.control_dependencies([supported]):
        # Each side is checked first so that the product cannot overflow int64.
        small = tf.logical_and(tf.logical_and(height <= max_pixels, width <= max_pixels),
                               height * width <= max_pixels)
        bounded = tf.debugging.Assert(small, [tf.strings.format(
            ENCODED_SIGNATURE + ": the image is {}x{} pixels (width x height), more than the "
            "bound of {} pixels; downscale it before sending.", (width, height, max_pixels))])
    with tf.control_dependencies([bounded]):
        return tf.identity(image_bytes)


def decode_and_preprocess(image_bytes, image_size: int, max_pixels: int = MAX_ENCODED_PIXELS,
                          preprocessing: str = "imagenet"):
    """Encoded image bytes (a scalar string) -> float32 [size, size, 3] pixels in [0, 255].

    The header is checked first (:func:`check_encoded_image`), so an oversized or unsupported
    image is refused before anything is decoded. With ``preprocessing`` "imagenet", JPEGs take
    exactly the evaluation pipeline's path (``imagenet.preprocess_eval``); PNGs are decoded
    whole, then cropped with the same window and resized the same way. With "resize" or
    "cifar" the whole image is resized (``imagenet.decode_whole``), as their evaluation does.
    """
    image_bytes = check_encoded_image(image_bytes, max_pixels)
    if preprocessing != "imagenet":
        return imagenet.decode_whole(image_bytes, image_size)

    def png():
        image = tf.io.decode_png(image_bytes, channels=3)
        y, x, h, w = tf.unstack(imagenet.center_crop_window(tf.shape(image), image_size))
        image = tf.cast(tf.image.crop_to_bounding_box(image, y, x, h, w), tf.float32)
        return tf.clip_by_value(
            tf.image.resize(image, [image_size, image_size], method="bicubic"), 0.0, 255.0)

    image = tf.cond(tf.io.is_jpeg(image_bytes),
                    lambda: imagenet.preprocess_eval(image_bytes, image_size), png)
    return tf.ensure_shape(image, [image_size, image_size, 3])


class _Serving(tf.Module):
    """The exported object: the model's variables and the signature functions."""

    def __init__(self, model: keras.Model, image_size: int, metadata_json: str, asset_path: str,
                 max_encoded_pixels: int, preprocessing: str = "imagenet"):
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
            # With oneDNN (TF_ENABLE_ONEDNN_OPTS=1) batch norm fails on an empty batch
            # ("Incompatible shapes: [C] vs. [0,H,W,3]"): give the model one zero image then and
            # slice its logits away. Zero padding costs nothing (Pad forwards its input); a
            # tf.cond around the model would not be differentiable once loaded.
            n = tf.shape(images)[0]
            padded = tf.pad(images, [[0, tf.maximum(1 - n, 0)], [0, 0], [0, 0], [0, 0]])
            logits = tf.cast(model(padded, training=False), tf.float32)[:n]
            return {"logits": logits, "probabilities": tf.nn.softmax(logits),
                    "classes": tf.argmax(logits, axis=-1, output_type=tf.int32)}

        def serve(images):
            finite = tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(images)), [
                f"{SERVING_SIGNATURE}: {PIXELS_ERROR}; got NaN or infinite values."])
            with tf.control_dependencies([finite]):
                return outputs(tf.identity(images))

        self.serve = tf.function(
            serve, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, "images")])

        def serve_encoded(image_bytes):
            images = tf.map_fn(lambda b: decode_and_preprocess(b, size, max_encoded_pixels,
                                                               preprocessing),
                               image_bytes,
                               fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
            return outputs(images)

        self.serve_encoded = tf.function(
            serve_encoded, input_signature=[tf.TensorSpec([None], tf.string, "image_bytes")])
        self.metadata = tf.function(lambda: {"json": tf.constant(self._metadata_json)},
                                    input_signature=[])


class ExportError(OSError):
    """Writing the export failed (disk full, quota, permissions, ...); the message is one line
    naming the folder and the reason. Nothing partial is left behind."""


def _is_remote(path: str) -> bool:
    return "://" in path


def is_export(path: str) -> bool:
    """Whether ``path`` holds a sat_tf export (``saved_model.pb`` and the metadata asset)."""
    return loading.is_export(path, tf.io.gfile)


def check_export_dir(export_dir: str, overwrite: bool = False) -> bool:
    """Raises a one-line :class:`~sat_tf.errors.UserError` unless ``export_dir`` is absent, an
    empty folder, or (with ``overwrite``) a previous sat_tf export; local or remote. Returns
    whether a previous export will be replaced (``loading.check_export_dir``'s rules)."""
    return loading.check_export_dir(export_dir, overwrite, tf.io.gfile)


# The reasons a write fails, as the OS words them; TensorFlow's errors quote them
# ("...saved_model.pb.tmp...; No space left on device").
_OS_REASONS = tuple(os.strerror(n) for n in (
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.ENAMETOOLONG, errno.EXDEV,
    errno.EMFILE, errno.ENOMEM))


def _reason(e: BaseException) -> str:
    """The OS reason of a failed write (e.g. "No space left on device"), else its first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = e.message if isinstance(e, tf.errors.OpError) else str(e)
    for reason in _OS_REASONS:
        if reason in text:
            return reason
    lines = [re.sub(r"\{\{[^}]*\}\}", "", line).strip() for line in text.splitlines()]
    return next((line for line in lines if line), type(e).__name__)


def _write_in_place(export_dir: str, write, replace: bool) -> None:
    """Runs ``write(staging_export, staging_asset_folder)`` in a hidden sibling of
    ``export_dir`` and renames the result into place; on any failure removes the sibling,
    restores a previous export that was being replaced, and raises :class:`ExportError`
    (OS and TensorFlow I/O errors) or the original exception."""
    target = export_dir.rstrip("/") if _is_remote(export_dir) else os.path.abspath(export_dir)
    parent, name = os.path.split(target)
    # Same parent, so the rename never crosses file systems; hidden, so nobody takes it for an
    # export. It holds the new export, its metadata asset's source and, briefly, the old export.
    staging = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:12]}")
    new, previous = os.path.join(staging, "export"), os.path.join(staging, "previous")
    moved_aside = False
    try:
        tf.io.gfile.makedirs(os.path.join(staging, "asset"))
        write(new, os.path.join(staging, "asset"))
        if replace:
            tf.io.gfile.rename(target, previous)
            moved_aside = True
        elif _is_remote(target) and tf.io.gfile.exists(target):
            tf.io.gfile.rmtree(target)     # an empty folder (a marker object)
        # Locally rename(2): atomic, and it replaces an empty folder (and only an empty one).
        tf.io.gfile.rename(new, target, overwrite=True)
    except BaseException as e:
        if moved_aside and not tf.io.gfile.exists(target):
            tf.io.gfile.rename(previous, target)
        _remove(staging)
        if not isinstance(e, (OSError, tf.errors.OpError)):
            raise
        left = (f"; could not remove {staging!r}" if tf.io.gfile.exists(staging) else
                "; nothing was left behind")
        kept = ", the previous export is unchanged" if replace else ""
        raise ExportError(f"Could not write the export to {export_dir!r}: {_reason(e)}"
                          f"{left}{kept}.") from e
    _remove(staging)


def _remove(path: str) -> None:
    try:
        if tf.io.gfile.exists(path):
            tf.io.gfile.rmtree(path)
    except (OSError, tf.errors.OpError):
        pass


def export_saved_model(model: keras.Model, export_dir: str, *, metadata: dict | None = None,
                       image_size: int | None = None, overwrite: bool = False,
                       max_encoded_pixels: int = MAX_ENCODED_PIXELS,
                       preprocessing: str = "imagenet") -> str:
    """Writes ``model`` (pixels -> logits) as a SavedModel in ``export_dir``.

    The SavedModel is written next to ``export_dir`` under a hidden name and renamed into place
    when complete: a failed write leaves no partial folder, and a previous export being
    replaced stays as it was.

    Args:
      model: a Keras model taking float32 [batch, size, size, 3] pixels in [0, 255]. Give the
        weights to export (EMA weights already swapped in by ``rundir.load_model``).
      export_dir: a new or empty folder (local or gs://), or a previous export with
        ``overwrite``.
      metadata: facts to record (model name, activation, training step, weights, ...); the
        image size, class count, preprocessing and input checks are added.
      image_size: defaults to the model's static input size.
      overwrite: replace ``export_dir`` if it holds a previous sat_tf export (nothing else is
        ever replaced).
      max_encoded_pixels: the largest image (width x height) ``serving_encoded`` decodes.
      preprocessing: the run's ``data.preprocessing``: "imagenet" (``serving_encoded``
        centre-crops), "resize" or "cifar" (it resizes the whole image).

    Returns:
      export_dir.

    Raises:
      ValueError: a bad argument.
      UserError: ``export_dir`` is taken.
      ExportError: the write failed (one line: the folder and the OS reason).
    """
    shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else ()
    if image_size is None:
        if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3:
            raise ValueError(f"Cannot read the image size from model input shape {shape}; pass "
                             "image_size.")
        image_size = int(shape[1])
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"Invalid image_size {image_size!r}; it must be a positive integer.")
    if not isinstance(max_encoded_pixels, int) or max_encoded_pixels <= 0:
        raise ValueError(f"Invalid max_encoded_pixels {max_encoded_pixels!r}; it must be a "
                         "positive integer.")
    if preprocessing not in ("imagenet", "resize", "cifar"):
        raise ValueError(f"Invalid preprocessing {preprocessing!r}; valid choices: imagenet, "
                         "resize, cifar.")
    replace = check_export_dir(export_dir, overwrite)
    num_classes = int(model.outputs[0].shape[-1]) if getattr(model, "outputs", None) else None
    meta = dict(metadata or {})
    meta.update({
        "format": "sat_tf.export/1",
        "image_size": image_size,
        "num_classes": num_classes,
        "input": "float32 RGB pixels in [0, 255], NHWC (the model scales them itself)",
        "preprocessing": preprocessing_text(preprocessing),
        "data_preprocessing": preprocessing,
        "input_checks": {
            SERVING_SIGNATURE: (f"NaN or infinite pixels: InvalidArgumentError ('{PIXELS_ERROR}'"
                                "); finite values outside [0, 255] reach the model unchanged, "
                                "as with the Keras model; an empty batch gives [0, classes]"),
            ENCODED_SIGNATURE: (f"{'/'.join(ENCODED_FORMATS)} only; width x height at most "
                                "max_encoded_pixels, read from the header before decoding, "
                                "else InvalidArgumentError; an empty batch gives [0, classes]"),
        },
        "max_encoded_pixels": max_encoded_pixels,
        "encoded_formats": list(ENCODED_FORMATS),
        "signatures": {SERVING_SIGNATURE: "images -> logits, probabilities, classes",
                       ENCODED_SIGNATURE: "image_bytes -> logits, probabilities, classes",
                       METADATA_SIGNATURE: "() -> json"},
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    })
    text = json.dumps(meta, indent=2, sort_keys=True)

    def write(path, asset_folder):
        asset = os.path.join(asset_folder, METADATA_ASSET)
        with tf.io.gfile.GFile(asset, "w") as f:
            f.write(text + "\n")
        module = _Serving(model, image_size, text, asset, max_encoded_pixels, preprocessing)
        tf.saved_model.save(module, path, signatures={
            SERVING_SIGNATURE: module.serve.get_concrete_function(),
            ENCODED_SIGNATURE: module.serve_encoded.get_concrete_function(),
            METADATA_SIGNATURE: module.metadata.get_concrete_function(),
        })

    _write_in_place(export_dir, write, replace)
    return export_dir


class ServingModel:
    """A loaded export as a callable ``images -> logits`` (pure TensorFlow, no model code).

    Checks the input dtype and shape with a one-line error; differentiable, so
    ``attacks.pgd`` and ``evaluation.evaluate`` accept it in place of the Keras model.
    """

    def __init__(self, export_dir: str):
        if not tf.io.gfile.exists(os.path.join(export_dir, "saved_model.pb")):
            raise UserError(f"No SavedModel in {export_dir!r} (saved_model.pb not found).")
        self.export_dir = export_dir
        self.loaded = tf.saved_model.load(export_dir)
        missing = {SERVING_SIGNATURE, METADATA_SIGNATURE} - set(self.loaded.signatures)
        if missing:
            raise UserError(f"{export_dir!r} is not a sat_tf export (missing signatures "
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


# ---------------------------------------------------------------------------------------------
# A training run's export

def run_metadata(loaded: loading.LoadedModel) -> dict:
    """What the export of a training run records about where it came from: the model, the
    training step and weights, the checkpoint, the run's whole experiment and paper numbers."""
    experiment = loaded.experiment
    return {"model": loaded.name, "activation": loaded.activation,
            "normalization": experiment.model.normalization, "step": loaded.step,
            "weights": loaded.weights, "checkpoint": loaded.checkpoint,
            "experiment_name": experiment.name, "experiment": experiment.to_dict(),
            "paper": experiment.paper}


def run_preprocessing(experiment: Experiment) -> str:
    """The run's recorded preprocessing (runs from before it was recorded: the dataset's
    default, as those runs evaluated)."""
    return experiment.data.preprocessing or data.default_preprocessing(
        experiment.data.dataset, None)


@dataclasses.dataclass(frozen=True)
class Exported:
    """What :func:`export_run` wrote."""
    loaded: loading.LoadedModel      # the model exported and its facts
    export_dir: str
    replaced: bool                   # a previous export was overwritten

    def summary(self) -> str:
        """One line naming the model, where it came from, where it went and the signatures."""
        m = self.loaded
        return (f"Exported {m.name} ({m.activation}, step {m.step}, {m.weights} weights, "
                f"{m.image_size}x{m.image_size}, {m.num_classes} classes) from {m.checkpoint} "
                f"to {self.export_dir}"
                f"{' (replacing the previous export)' if self.replaced else ''}; "
                f"signatures: {SERVING_SIGNATURE}, {ENCODED_SIGNATURE}, {METADATA_SIGNATURE}.")


def export_run(source: loading.Source, export_dir: str, *, overwrite: bool = False) -> Exported:
    """Loads a training run (``source`` from ``loading.resolve(model_dir=...)``: its latest or
    given checkpoint, EMA weights as the source says) and exports it with
    :func:`export_saved_model`, recording :func:`run_metadata` and serving the run's
    evaluation preprocessing.

    Raises:
      ValueError: the run holds no readable checkpoint, or ``export_dir`` is taken (one line).
      ExportError: the write failed; nothing partial is left behind.
    """
    loaded = loading.load(source)
    replaced = overwrite and is_export(export_dir)
    export_saved_model(loaded.model, export_dir, image_size=loaded.image_size,
                       metadata=run_metadata(loaded), overwrite=overwrite,
                       preprocessing=run_preprocessing(loaded.experiment))
    return Exported(loaded, export_dir, replaced)
