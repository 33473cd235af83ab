"""How much memory one replica of a training run needs, estimated before TensorFlow starts.

A run that cannot fit should stop with one line, not be killed by the OOM killer minutes
later (EfficientNet-L1 at 600 px with 4096 images on one CPU replica needs terabytes). The
estimate is analytic and imports no TensorFlow: the model family's registered object
(:mod:`sat_tf.families`) walks its architecture as data exactly as
:func:`sat_tf.models.build_model` turns it into layers, and counts

* the **activations**: the float elements of every layer output one example's forward pass
  produces (input scaling, explicit padding, convolutions, batch norms, activations, adds,
  pooling, squeeze-and-excitation, dropout, logits), :func:`activation_elements`; spatial
  sizes follow each stride as ``ceil(size / stride)`` (the 'same' and the explicit
  ``(k - 1) // 2`` padding both give that);
* the **weights**: the trainable parameters (the family's ``count_params``), in float32,
  with their gradients, the optimizer's slots and, with EMA, one averaged copy.

What a training step keeps alive at once (:data:`TRAINING_FACTOR`): the forward pass keeps
the tensors the backward pass needs to differentiate each layer (a convolution's input, an
activation's input or output, a batch norm's input); the backward pass frees them layer by
layer while a few gradient tensors of the current layer's size are in flight. Counting every
layer output once covers both: several counted outputs are never kept (a padding's, an add's,
a batch norm's output when the next activation keeps only its own), and they outweigh the
gradients in flight. So the factor is 1: peak activation memory = summed layer outputs x
batch x bytes per element. Measured (the peak RSS a first PGD-1 training step adds, on CPU,
float32, 512 images) it was 0.67 (ResNet-18, ReLU, which keeps outputs only), 0.9 (ResNet-18 and
WRN-16-4, SiLU) and 1.0 (EfficientNet-B0, SiLU) of this count. Modest on purpose: accelerator
allocators and XLA may add some slack, but the purpose is to stop runs that are *clearly* too
large (several times over), never a run that might fit.

The PGD attack runs its forward and input-gradient passes at ``training=False`` before the
training forward pass; each attack step's activations are freed at the end of the step (the
step loop is a ``tf.while_loop``), and all of them before the training forward starts. So the
per-replica peak is the larger of the two phases, not their sum: the attack phase keeps at
most what the training phase keeps (the same layer outputs; no weight gradients), so the
activation estimate is that of the training phase, whatever the number of attack steps.

Mixed precision (``mixed_bfloat16`` / ``mixed_float16``) stores the layer outputs in 2 bytes
instead of 4; the weights, their gradients and the optimizer slots stay float32. (Keras' batch
norm computes in float32 and keeps a float32 copy of its input, so the real saving is smaller:
ResNet-18 with SiLU measured 1.3x the 2-byte count, about 0.65x its float32 peak. The
estimate stays on the low side, as a check that stops runs should.)
"""
from __future__ import annotations

import dataclasses
import math
import os

from sat_tf import families
from sat_tf.errors import UserError

TRAINING_FACTOR = 1.0       # summed layer outputs ~ kept for backward + gradients in flight
WEIGHT_BYTES = 4            # weights, gradients, optimizer slots and EMA are float32
ACTIVATION_BYTES = {"float32": 4, "none": 4, "mixed_bfloat16": 2, "mixed_float16": 2}
ADVICE = "lower --train_batch_size, --image_size, or pick a smaller --model"


# ---------------------------------------------------------------------------------------------
# The model: its defaults and layer outputs per example, from its family.

def _shape(name: str, image_size: int | None,
           stem: str | None) -> tuple[families.Family, dict, int, str | None]:
    """(family, args, image_size, stem) with the defaults :func:`sat_tf.models.resolve` fills
    in (the family's)."""
    family, args = families.parse(name)
    if image_size is None:
        image_size = family.default_image_size(args, stem)
    return family, args, int(image_size), family.resolve_stem(stem, image_size)


def activation_elements(name: str, image_size: int | None = None, stem: str | None = None,
                        num_classes: int = 1000) -> int:
    """Float elements of all layer outputs of one example's forward pass through ``name``.

    Every layer :func:`sat_tf.models.build_model` creates is counted once (not the input);
    image size and stem default as there.
    """
    family, args, size, stem = _shape(name, image_size, stem)
    return family.activation_elements(args, size, stem, num_classes)


# ---------------------------------------------------------------------------------------------
# The estimate.

def format_bytes(n: float) -> str:
    """'412.3 GiB': binary units, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Per-replica memory of a training run, in bytes (see the module docstring)."""
    name: str
    image_size: int
    per_replica_batch: int
    attack_steps: int         # 0: clean training
    precision: str
    params: int
    activation_elements: int  # per example
    weight_bytes: int         # weights + gradients + optimizer slots (+ EMA), float32
    activation_bytes: int     # the peak of the attack and the training phase

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    def describe(self) -> str:
        """e.g. 'about 412.3 GiB'."""
        return f"about {format_bytes(self.total_bytes)}"

    def run(self) -> str:
        """e.g. 'efficientnet-l1 at 600 px with 4096 images per replica (PGD-1)'."""
        attack = f"PGD-{self.attack_steps}" if self.attack_steps else "clean"
        return (f"{self.name} at {self.image_size} px with {self.per_replica_batch} images "
                f"per replica ({attack})")


def estimate(name: str, *, image_size: int | None = None, stem: str | None = None,
             num_classes: int = 1000, per_replica_batch: int, attack_steps: int,
             adversarial: bool = True, precision: str = "float32", optimizer_slots: int = 1,
             ema: bool = False) -> Estimate:
    """The per-replica memory a training step of ``name`` needs.

    Args:
      name, image_size, stem, num_classes: the model, as :func:`sat_tf.models.build_model`
        takes them (None: its defaults).
      per_replica_batch: images per replica per step (the global batch / replicas).
      attack_steps: PGD steps of the training attack (they run one after another, so they
        change the description, not the peak); ignored when ``adversarial`` is False.
      precision: the Keras policy, "float32" (or "none"), "mixed_bfloat16", "mixed_float16".
      optimizer_slots: float32 copies of the weights the optimizer keeps (1 for SGD with
        momentum; 2 for RMSprop and Adam).
      ema: whether an exponential moving average of the weights is kept (one more copy).
    """
    if precision not in ACTIVATION_BYTES:
        raise UserError(f"Invalid precision {precision!r}; valid choices: "
                        f"{', '.join(ACTIVATION_BYTES)}.")
    if per_replica_batch <= 0:
        raise UserError(f"Invalid per_replica_batch {per_replica_batch!r}; it must be > 0.")
    family, args, size, stem = _shape(name, image_size, stem)
    # smooth_relu's one weight per activation call site is negligible here.
    params = family.count_params(args, stem, num_classes)
    elements = family.activation_elements(args, size, stem, num_classes)
    copies = 2 + optimizer_slots + (1 if ema else 0)          # weights, gradients, slots, EMA
    activation_bytes = math.ceil(elements * per_replica_batch * ACTIVATION_BYTES[precision]
                                 * TRAINING_FACTOR)
    return Estimate(family.canonical_name(args), size, int(per_replica_batch),
                    int(attack_steps) if adversarial else 0, precision, params, elements,
                    params * WEIGHT_BYTES * copies, activation_bytes)


# ---------------------------------------------------------------------------------------------
# The host, and the one-line verdict.

def available_bytes() -> int | None:
    """Memory available to a new process: MemAvailable of /proc/meminfo (Linux), else the
    free physical pages (``os.sysconf``), else None (unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024       # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def _advice(est: Estimate, available: int | None, what: str | None, where: str) -> str:
    """The one line both :func:`check_fits` and :func:`oom_advice` give."""
    has = (f"; {where} has {format_bytes(available)} available" if available is not None
           else "")
    return (f"{what or est.run()} needs {est.describe()} of memory per replica{has}: "
            f"{ADVICE} (estimate by sat_tf.memory).")


def check_fits(est: Estimate, available: int | None, *, what: str | None = None) -> None:
    """Raises a one-line UserError when ``est`` needs more than ``available`` bytes.

    ``what`` describes the run (default :meth:`Estimate.run`, e.g. "efficientnet-l1 at
    600 px with 4096 images per replica (PGD-1)"). Nothing happens when ``available`` is
    None (unknown).
    """
    if available is not None and est.total_bytes > available:
        raise UserError(_advice(est, available, what, "this host"))


def oom_advice(est: Estimate, available: int | None = None, *, what: str | None = None) -> str:
    """The same line as :func:`check_fits`, for an out-of-memory error an accelerator raised
    (``available``: its memory, when known)."""
    return _advice(est, available, what, "the device")
