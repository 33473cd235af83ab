"""Typed experiment configuration.

An :class:`Experiment` is the single object the command-line programs build (from a named
preset plus flag overrides) and hand to the library. Nothing below ``run/`` reads flags.

Each section belongs to one part of the library (DESIGN.md §2):
``model`` -> sat_tf.models, ``data`` -> sat_tf.data, ``train_attack`` / ``eval_attack`` ->
sat_tf.attacks, ``train`` (what is trained, how long) -> sat_tf.step and sat_tf.training,
``optimizer`` -> sat_tf.optimizers, ``schedule`` -> sat_tf.schedules, ``loop`` (cadence) ->
sat_tf.training, ``runtime`` -> sat_tf.distribute, ``evaluation`` -> run/eval.py's protocol
(sat_tf.robustness).

``validate()`` is the one place that checks a value that can be checked without TensorFlow:
it raises a one-line :class:`~sat_tf.errors.UserError` naming the bad value and the valid
choices, so bad input fails before any work starts. Every field has a dotted path
(``optimizer.momentum``); :func:`parse_override` reads ``path=value`` as the field's type.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from sat_tf import names
from sat_tf.errors import UserError, check_choice

DATASETS = ("synthetic", "digits", "cifar10", "imagenet", "images")
# How a folder of encoded images (imagenet, images) becomes model input: "imagenet" (random
# resized crop / centre crop of size/(size+32)), "resize" (the whole image resized; random
# flip in training), "cifar" (the whole image resized, then pad-4 random crop and flip).
PREPROCESSINGS = ("imagenet", "resize", "cifar")
LABEL_BASES = (0, 1)
DATA_SOURCES = ("tfrecord", "tfds")
AUGMENTATIONS = ("none", "randaugment", "autoaugment")
CIFAR_PADDINGS = ("reflect", "zero")
OPTIMIZERS = ("sgd_nesterov", "sgd", "rmsprop", "adam")
LR_SCHEDULES = ("step", "cosine", "exponential", "constant")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
MIXED_PRECISION = ("auto", "none", "mixed_bfloat16", "mixed_float16")
ATTACK_MODES = ("untargeted", "targeted")
# Evaluation attacks (sat_tf.autoattack); training and the run's own evaluations use pgd.
ATTACK_METHODS = ("pgd", "apgd-ce", "apgd-t", "square", "autoattack")
RESUME_INPUT = ("restart", "skip")
WEIGHT_DECAY_SCOPES = ("kernels", "non_bn")


_choice = check_choice


MAX_COUNT = 2**31 - 1   # steps, batches, examples...: TensorFlow counts them in int32 or int64
MAX_SEED = 2**32 - 1    # NumPy's and Keras' seeds are 32-bit unsigned


def _positive(what: str, value, allow_zero: bool = False) -> None:
    """``value`` > 0 (or >= 0), and finite; an integer also at most :data:`MAX_COUNT`."""
    bound = ">= 0" if allow_zero else "> 0"
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and (value >= 0 if allow_zero else value > 0))
    if ok and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"Invalid {what} {value!r}; it must be a finite number {bound}.")
    if ok and isinstance(value, int) and value > MAX_COUNT:
        raise UserError(f"Invalid {what} {value!r}; it must be at most {MAX_COUNT}.")
    if not ok:
        raise UserError(f"Invalid {what} {value!r}; it must be {bound}.")


def _fraction(what: str, value, *, closed: bool = False) -> None:
    """``value`` in [0, 1) (or [0, 1] when ``closed``)."""
    ok = isinstance(value, (int, float)) and (0.0 <= value <= 1.0 if closed
                                              else 0.0 <= value < 1.0)
    if not ok:
        raise UserError(f"Invalid {what} {value!r}; it must be in [0, {'1]' if closed else '1)'}.")


def _seed(what: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise UserError(f"Invalid {what} {value!r}; it must be an integer in [0, {MAX_SEED}].")


@dataclass
class ModelConfig:
    name: str = "resnet-50"
    activation: str = "relu"
    num_classes: int | None = None         # None: the dataset's class count
    image_size: int | None = None          # None: the model's default (EfficientNet table) / dataset's
    normalization: str = "sat"             # "sat": x*2/255-1; "imagenet": mean/std
    stem: str | None = None                # ResNet only; None: "cifar" up to 64x64 inputs, else "imagenet"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dropout_rate: float | None = None      # None: the model's default (EfficientNet table)
    drop_connect_rate: float | None = None  # None: the model's default (EfficientNet 0.2)

    def validate(self) -> None:
        """The checks :func:`sat_tf.models.build_model` makes (:func:`sat_tf.names.check_model`);
        num_classes and image_size None are the dataset's, checked when the model is built."""
        names.check_model(self.name, self.activation, self.num_classes, self.image_size,
                          self.normalization, self.stem, self.bn_momentum, self.bn_epsilon,
                          self.dropout_rate, self.drop_connect_rate)


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    data_dir: str | None = None            # TFRecord folder (local or gs://), or TFDS data_dir
    source: str | None = None              # "tfrecord" (our/official shards) or "tfds"; None: the
                                           # dataset's usual one (cifar10: tfds, imagenet: tfrecord)
    manual_dir: str | None = None          # TFDS imagenet2012 manual download folder
    augment: str = "none"                  # ImageNet train: "randaugment" (N=2, M=10) / "autoaugment"
    randaugment_layers: int = 2
    randaugment_magnitude: float = 10.0
    cifar_padding: str = "reflect"
    shuffle_buffer: int = 10_000
    seed: int = 0
    cache_eval: bool = False
    skip_corrupt: bool = False
    num_parallel_reads: int = 16           # TFRecord files read at once (interleave cycle length)
    # Synthetic data (smoke runs and tests): a learnable task, class-coloured noise.
    synthetic_image_size: int = 32
    synthetic_num_classes: int = 10
    synthetic_train_examples: int = 1024
    synthetic_eval_examples: int = 256
    # Facts of the data. None: read from the folder's conversion.json (run/make_tfrecords.py
    # writes it), else the dataset's known values (ImageNet: 1000 classes, 1,281,167 / 50,000
    # images, 1-based labels). A run records the values it used in experiment.json.
    num_classes: int | None = None
    num_train_examples: int | None = None
    num_eval_examples: int | None = None
    label_base: int | None = None          # the first label on disk: 1 (official), or 0
    preprocessing: str | None = None       # PREPROCESSINGS; None: by the images' size

    def validate(self) -> None:
        _choice("dataset", self.dataset, DATASETS)
        for what in ("num_classes", "num_train_examples", "num_eval_examples"):
            if getattr(self, what) is not None:
                _positive(f"data {what}", getattr(self, what))
        if self.label_base is not None:
            _choice("label_base", self.label_base, LABEL_BASES)
        if self.preprocessing is not None:
            _choice("preprocessing", self.preprocessing, PREPROCESSINGS)
            own = {"cifar10": "cifar", "digits": "resize", "synthetic": "resize"}.get(self.dataset)
            if own is not None and self.preprocessing != own:
                raise UserError(f"Invalid preprocessing {self.preprocessing!r} for dataset "
                                f"{self.dataset!r}; it has only {own!r} (the choice applies "
                                "to imagenet and images folders).")
        if self.source is not None:
            _choice("data source", self.source, DATA_SOURCES)
        _choice("augmentation", self.augment, AUGMENTATIONS)
        _choice("cifar_padding", self.cifar_padding, CIFAR_PADDINGS)
        _seed("data seed", self.seed)
        _positive("shuffle_buffer", self.shuffle_buffer)
        _positive("num_parallel_reads", self.num_parallel_reads)
        _positive("randaugment_layers", self.randaugment_layers, allow_zero=True)
        if not 0.0 <= self.randaugment_magnitude <= 30.0:
            raise UserError(f"Invalid randaugment_magnitude {self.randaugment_magnitude!r}; "
                            "it must be in [0, 30].")
        _positive("synthetic_image_size", self.synthetic_image_size)
        _positive("synthetic_num_classes", self.synthetic_num_classes)
        _positive("synthetic_train_examples", self.synthetic_train_examples)
        _positive("synthetic_eval_examples", self.synthetic_eval_examples)
        if self.augment != "none" and self.dataset not in ("imagenet", "images"):
            raise UserError(f"Invalid augmentation {self.augment!r} for dataset {self.dataset!r}; "
                            "RandAugment/AutoAugment apply to imagenet and images only (use "
                            "'none').")
        if (self.dataset in ("imagenet", "images") and self.resolved_source() == "tfrecord"
                and not self.data_dir):
            raise UserError(f"dataset {self.dataset!r} needs data_dir (a folder of "
                            "train-*/validation-* TFRecords).")
        if self.dataset in ("synthetic", "digits", "images") and self.source == "tfds":
            raise UserError(f"Invalid data source 'tfds' for dataset {self.dataset!r}; valid "
                            "choices: tfrecord (or none).")

    def resolved_source(self) -> str:
        """``source``, or the dataset's usual source when it is None."""
        if self.source is not None:
            return self.source
        return "tfds" if self.dataset == "cifar10" else "tfrecord"


@dataclass
class AttackConfig:
    """An L-infinity attack in pixel units of [0, 255] (epsilon 4 means 4/255): PGD, or for
    evaluation one of :data:`ATTACK_METHODS` (sat_tf.autoattack)."""

    epsilon: float = 4.0
    step_size: float = 4.0                 # pgd only (APGD adapts its own from 2 epsilon)
    num_steps: int = 1                     # pgd / APGD iterations (square: unused)
    random_start: bool = True
    clean_start_prob: float = 0.2          # probability a batch starts from the clean image
    mode: str = "untargeted"
    backward: str | None = None            # Table 1: the attacker's backward rule (None: natural)
    method: str = "pgd"                    # ATTACK_METHODS
    num_targets: int = 9                   # apgd-t / autoattack: target classes tried
    queries: int = 5000                    # square / autoattack: Square's query budget

    def validate(self) -> None:
        _positive("attack epsilon", self.epsilon, allow_zero=True)
        _positive("attack step size", self.step_size, allow_zero=True)
        _positive("attack steps", self.num_steps, allow_zero=True)
        if not 0.0 <= self.clean_start_prob <= 1.0:
            raise UserError(f"Invalid clean_start_prob {self.clean_start_prob!r}; it must be in [0, 1].")
        _choice("attack mode", self.mode, ATTACK_MODES)
        names.backward_rule(self.backward)
        _choice("attack method", self.method, ATTACK_METHODS)
        _positive("APGD-T target classes", self.num_targets)
        _positive("Square queries", self.queries)


@dataclass
class TrainConfig:
    """What is trained on and how long: the adversarial or clean images, the batch, the length,
    the loss's label smoothing, Table 1's optimizer arm, the EMA and the seed."""

    adversarial: bool = True               # False: clean training with the same code (baselines)
    global_batch_size: int = 256
    train_epochs: float | None = 100       # one of train_epochs / train_steps
    train_steps: int | None = None
    num_train_examples: int | None = None  # None: the dataset's
    label_smoothing: float = 0.1
    ema_decay: float | None = None         # e.g. 0.9999; None: no EMA
    optimizer_backward: str | None = None  # Table 1: the optimizer's backward rule (None: natural)
    seed: int = 0
    init_from: str | None = None           # a run directory whose weights start this run

    def validate(self) -> None:
        _positive("global batch size", self.global_batch_size)
        if self.train_steps is None and self.train_epochs is None:
            raise UserError("Set one of train_epochs or train_steps.")
        if self.train_steps is not None:
            _positive("train_steps", self.train_steps)
        if self.train_epochs is not None:
            _positive("train_epochs", self.train_epochs)
        if self.num_train_examples is not None:
            _positive("num_train_examples", self.num_train_examples)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"Invalid label_smoothing {self.label_smoothing!r}; it must be in "
                            "[0, 1).")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise UserError(f"Invalid ema_decay {self.ema_decay!r}; it must be in (0, 1).")
        _seed("seed", self.seed)
        names.backward_rule(self.optimizer_backward)


@dataclass
class OptimizerConfig:
    """The optimizer and the weight decay added to the loss."""

    name: str = "sgd_nesterov"             # OPTIMIZERS
    momentum: float = 0.9                  # SGD / RMSProp momentum, Adam's beta_1
    rmsprop_decay: float = 0.9
    epsilon: float = 1e-3                  # RMSProp epsilon of the EfficientNet recipe
    weight_decay: float = 1e-4             # wd * 0.5 * sum(w^2) over the weights of ...
    # ... weight_decay_scope: "kernels", the convolution and dense kernels only (the SAT
    # release's ResNet, tensorpack's ".*/W": no biases, no SmoothReLU beta); "non_bn", every
    # trainable weight outside batch normalization (the TPU EfficientNet code).
    weight_decay_scope: str = "non_bn"

    def validate(self) -> None:
        _choice("optimizer", self.name, OPTIMIZERS)
        _fraction("momentum", self.momentum)
        if not 0.0 <= self.rmsprop_decay < 1.0:
            raise UserError(f"Invalid rmsprop_decay {self.rmsprop_decay!r}; it must be in [0, 1).")
        _positive("optimizer epsilon", self.epsilon)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _choice("weight_decay_scope", self.weight_decay_scope, WEIGHT_DECAY_SCOPES)


@dataclass
class ScheduleConfig:
    """The learning rate over training: a linear warm-up, then the named schedule."""

    name: str = "step"                     # LR_SCHEDULES
    base_learning_rate: float = 0.1        # per 256 images; scaled by global_batch_size / 256
    warmup_epochs: float = 5.0
    decay_boundaries: tuple[float, ...] = (30.0, 60.0, 90.0)  # epochs, for "step"
    decay_factor: float = 0.1              # "step": multiply at each boundary
    decay_epochs: float = 2.4              # "exponential": every decay_epochs ...
    decay_rate: float = 0.97               # ... multiply by decay_rate

    def validate(self) -> None:
        _choice("learning-rate schedule", self.name, LR_SCHEDULES)
        _positive("base learning rate", self.base_learning_rate)
        _positive("warmup_epochs", self.warmup_epochs, allow_zero=True)
        if list(self.decay_boundaries) != sorted(self.decay_boundaries) or any(
                b <= 0 for b in self.decay_boundaries):
            raise UserError(f"Invalid decay_boundaries {tuple(self.decay_boundaries)!r}; they "
                            "must be positive epochs in increasing order.")
        _positive("decay_factor", self.decay_factor)
        _positive("decay_epochs", self.decay_epochs)
        _positive("decay_rate", self.decay_rate)


@dataclass
class LoopConfig:
    """The cadence of the training loop: host round trips, checkpoints, logs and summaries,
    periodic evaluation, and how a resumed run positions its input."""

    steps_per_loop: int = 100              # the TPU code's iterations_per_loop
    checkpoint_every_steps: int = 1000
    max_checkpoints_to_keep: int = 5
    summary_every_steps: int = 100
    summary_images: int = 3                # adversarial examples written to TensorBoard
    eval_every_steps: int | None = None    # None: evaluate only at the end
    eval_steps: int | None = None          # None: the whole validation split
    eval_batch_size: int | None = None     # periodic evaluation; None: global_batch_size
    # "restart" begins the input pipeline afresh (cheap; what TPUEstimator and Keras fit do);
    # "skip" replays and discards the batches consumed before the checkpoint, so a resumed run
    # sees exactly the batches an uninterrupted one would (with op determinism:
    # bitwise-identical weights), at the input time of those batches.
    resume_input: str = "restart"

    def validate(self) -> None:
        _positive("steps_per_loop", self.steps_per_loop)
        _positive("checkpoint_every_steps", self.checkpoint_every_steps)
        _positive("max_checkpoints_to_keep", self.max_checkpoints_to_keep)
        _positive("summary_every_steps", self.summary_every_steps)
        _positive("summary_images", self.summary_images, allow_zero=True)
        if self.eval_every_steps is not None:
            _positive("eval_every_steps", self.eval_every_steps)
        if self.eval_steps is not None:
            _positive("eval_steps", self.eval_steps)
        if self.eval_batch_size is not None:
            _positive("eval batch size", self.eval_batch_size)
        _choice("resume_input", self.resume_input, RESUME_INPUT)


@dataclass
class RuntimeConfig:
    strategy: str = "default"
    tpu: str | None = None                 # TPU name, grpc:// address, or "local" (TPU VM)
    num_gpus: int | None = None            # mirrored: None uses every visible GPU
    devices: tuple[str, ...] | None = None  # mirrored: explicit devices, e.g. ("/gpu:0", "/gpu:1")
    logical_cpus: int | None = None        # split the CPU into N logical devices (CPU testing of
                                           # multi-replica strategies); before TF starts its devices
    mixed_precision: str = "auto"          # "auto": mixed_bfloat16 on a TPU (as the TPU code
                                           # trains), else none (float32)
    jit_compile: bool = False
    deterministic: bool = False            # tf.config.experimental.enable_op_determinism
    peer_timeout_seconds: float = 900.0    # multi_worker: how long workers wait for each other
                                           # at start-up before failing

    def precision_policy(self) -> str:
        """The Keras mixed-precision policy name: ``mixed_precision`` with "auto" resolved."""
        if self.mixed_precision == "auto":
            return "mixed_bfloat16" if self.tpu else "float32"
        return "float32" if self.mixed_precision == "none" else self.mixed_precision

    def validate(self) -> None:
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("mixed precision policy", self.mixed_precision, MIXED_PRECISION)
        if self.tpu and self.mixed_precision == "mixed_float16":
            raise UserError("Invalid mixed precision policy 'mixed_float16' with a TPU (TPUs "
                            "compute in bfloat16); valid choices: auto, mixed_bfloat16, none.")
        if self.strategy == "tpu" and not self.tpu:
            raise UserError("strategy 'tpu' needs a TPU name, address or 'local'.")
        if self.num_gpus is not None:
            _positive("num_gpus", self.num_gpus, allow_zero=True)
        if self.logical_cpus is not None:
            _positive("logical_cpus", self.logical_cpus)
        if self.devices is not None and self.num_gpus is not None:
            raise UserError("Give either devices or num_gpus, not both.")
        for what in ("devices", "num_gpus"):
            if getattr(self, what) is not None and self.strategy not in ("mirrored", "one_device"):
                raise UserError(f"{what}={getattr(self, what)!r} applies to strategy 'mirrored' "
                                f"or 'one_device', not {self.strategy!r}.")
        if self.tpu and self.strategy not in ("default", "tpu"):
            raise UserError(f"tpu={self.tpu!r} needs strategy 'tpu' (or 'default'), not "
                            f"{self.strategy!r}.")
        _positive("peer_timeout_seconds", self.peer_timeout_seconds)


@dataclass
class EvalConfig:
    """The robustness protocol of run/eval.py, around the run's own evaluation attack
    (``Experiment.eval_attack``: the PGD its evaluations during training run, whose epsilon
    and step count are always part of the protocol and whose step size and random start every
    attack takes): every combination of steps x epsilons x modes is run
    (:meth:`Experiment.evaluation_attacks`)."""

    attack_steps: tuple[int, ...] = (10, 20, 50)  # with eval_attack.num_steps
    attack_epsilons: tuple[float, ...] = ()       # with eval_attack.epsilon
    attack_restarts: int = 1
    attack_modes: tuple[str, ...] = ("untargeted",)
    attacks: tuple[str, ...] = ("pgd",)           # ATTACK_METHODS
    square_queries: int = 5000                    # Square's budget (alone and in autoattack)
    apgd_targets: int = 9                         # APGD-T's target classes
    global_batch_size: int | None = None   # None: 128 rounded up to a multiple of the replicas
    use_ema: bool = True                   # evaluate EMA weights when the run kept them
    sanity_epsilon: float | None = 64.0    # extra PGD-20 at this epsilon: must reach ~0 (None: off)
    max_batches: int | None = None         # None: the whole validation split
    seed: int = 0                          # random starts and targets

    def validate(self) -> None:
        for s in self.attack_steps:
            _positive("attack steps", s, allow_zero=True)
        for e in self.attack_epsilons:
            _positive("attack epsilon", e, allow_zero=True)
        _positive("attack restarts", self.attack_restarts)
        if not self.attack_modes:
            raise UserError(f"Invalid attack modes (); valid choices: {', '.join(ATTACK_MODES)}.")
        for m in self.attack_modes:
            _choice("attack mode", m, ATTACK_MODES)
        if not self.attacks:
            raise UserError(f"Invalid attacks (); valid choices: {', '.join(ATTACK_METHODS)}.")
        for m in self.attacks:
            _choice("attack", m, ATTACK_METHODS)
        _positive("Square queries", self.square_queries)
        _positive("APGD-T target classes", self.apgd_targets)
        if self.global_batch_size is not None:
            _positive("eval batch size", self.global_batch_size)
        if self.sanity_epsilon is not None:
            _positive("sanity-check epsilon", self.sanity_epsilon)
        if self.max_batches is not None:
            _positive("max_batches", self.max_batches)
        _seed("evaluation seed", self.seed)


@dataclass
class Experiment:
    name: str = "custom"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train_attack: AttackConfig = field(default_factory=AttackConfig)
    eval_attack: AttackConfig = field(
        default_factory=lambda: AttackConfig(
            epsilon=4.0, step_size=1.0, num_steps=10, random_start=True, clean_start_prob=0.0))
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    model_dir: str | None = None
    # The paper's reported numbers this experiment targets, e.g. {"clean": 69.7, "pgd": 42.3}.
    paper: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "Experiment":
        for name in _SECTION_TYPES:
            getattr(self, name).validate()
        for name in ("train_attack", "eval_attack"):
            if getattr(self, name).method != "pgd":
                raise UserError(f"Invalid {name}.method {getattr(self, name).method!r}; "
                                "training and the run's own evaluations attack with 'pgd' "
                                "(the other methods are for run/eval.py --attacks).")
        self._check_remote_tpu_paths()
        return self

    def _check_remote_tpu_paths(self) -> None:
        """A TPU reached by name (a pod, or a TPU VM seen from elsewhere) runs the input
        pipelines and checkpoint writes on its own hosts, which cannot see this machine's
        disk: data and model_dir must be in a bucket. ``tpu="local"`` (the TPU VM this runs
        on) may use local paths."""
        tpu = self.runtime.tpu
        if not tpu or tpu == "local":
            return
        if self.model_dir and not self.model_dir.startswith("gs://"):
            raise UserError(
                f"Invalid model_dir {self.model_dir!r} for TPU {tpu!r}: the TPU hosts write "
                "the checkpoints, so it must be a gs:// path (local paths only with tpu "
                "'local', on a single TPU VM).")
        if self.data.dataset != "synthetic" and not (self.data.data_dir or "").startswith(
                "gs://"):
            raise UserError(
                f"Invalid data_dir {self.data.data_dir!r} for TPU {tpu!r}: the TPU hosts read "
                "the data (and TFDS prepares it there), so it must be a gs:// path (local paths "
                "only with tpu 'local', on a single TPU VM).")

    def evaluation_grid(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(steps, epsilons) of the robustness protocol: ``evaluation``'s joined with
        ``eval_attack``'s, in increasing order."""
        steps = {*self.evaluation.attack_steps, self.eval_attack.num_steps}
        epsilons = {*self.evaluation.attack_epsilons, self.eval_attack.epsilon}
        return tuple(sorted(int(s) for s in steps)), tuple(sorted(float(e) for e in epsilons))

    def evaluation_attacks(self) -> list[AttackConfig]:
        """Every attack of the robustness protocol, method by method (``evaluation.attacks``):
        pgd: mode x epsilon x steps (in that nesting order) of :meth:`evaluation_grid`;
        apgd-ce, apgd-t and autoattack: epsilon x steps (APGD iterations); square: epsilon
        (``evaluation.square_queries`` queries). Each takes ``eval_attack``'s random start and
        never starts from the clean image; pgd takes its step size (APGD adapts its own)."""
        ev = self.evaluation
        steps, epsilons = self.evaluation_grid()
        common = dict(step_size=float(self.eval_attack.step_size), clean_start_prob=0.0,
                      random_start=self.eval_attack.random_start, num_targets=ev.apgd_targets,
                      queries=ev.square_queries)
        out = []
        for method in dict.fromkeys(ev.attacks):
            if method == "pgd":
                out += [AttackConfig(epsilon=eps, num_steps=n, mode=mode, **common)
                        for mode in ev.attack_modes for eps in epsilons for n in steps]
            elif method == "square":
                out += [AttackConfig(epsilon=eps, num_steps=0, method=method, **common)
                        for eps in epsilons]
            else:
                mode = "targeted" if method == "apgd-t" else "untargeted"
                out += [AttackConfig(epsilon=eps, num_steps=n, mode=mode, method=method,
                                     **common) for eps in epsilons for n in steps]
        return out

    def replace(self, **overrides) -> "Experiment":
        """A deep copy with dotted-path overrides: ``exp.replace(**{"model.activation": "silu"})``."""
        new = copy.deepcopy(self)
        for path, value in overrides.items():
            set_field(new, path, value)
        return new

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Experiment":
        """The experiment a :meth:`to_dict` dictionary describes, also one written by an
        earlier version (:func:`_upgrade`: experiment.json of older runs, export metadata)."""
        d = _upgrade(d)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            sub = _SECTION_TYPES.get(f.name)
            if sub is not None and isinstance(v, dict):
                v = _section_from_dict(sub, v)
            kwargs[f.name] = v
        return cls(**kwargs)


_SECTION_TYPES = {
    "model": ModelConfig, "data": DataConfig, "train_attack": AttackConfig,
    "eval_attack": AttackConfig, "train": TrainConfig, "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig, "loop": LoopConfig, "runtime": RuntimeConfig,
    "evaluation": EvalConfig,
}

# Fields that moved, as (old dotted path, new dotted path): before issue 11 the train section
# also held the optimizer, the schedule and the loop's cadence.
MOVED = (
    ("train.optimizer", "optimizer.name"), ("train.momentum", "optimizer.momentum"),
    ("train.rmsprop_decay", "optimizer.rmsprop_decay"),
    ("train.optimizer_epsilon", "optimizer.epsilon"),
    ("train.weight_decay", "optimizer.weight_decay"),
    ("train.weight_decay_scope", "optimizer.weight_decay_scope"),
    ("train.lr_schedule", "schedule.name"),
    ("train.base_learning_rate", "schedule.base_learning_rate"),
    ("train.warmup_epochs", "schedule.warmup_epochs"),
    ("train.decay_boundaries", "schedule.decay_boundaries"),
    ("train.decay_factor", "schedule.decay_factor"),
    ("train.decay_epochs", "schedule.decay_epochs"),
    ("train.decay_rate", "schedule.decay_rate"),
    ("train.steps_per_loop", "loop.steps_per_loop"),
    ("train.checkpoint_every_steps", "loop.checkpoint_every_steps"),
    ("train.max_checkpoints_to_keep", "loop.max_checkpoints_to_keep"),
    ("train.summary_every_steps", "loop.summary_every_steps"),
    ("train.summary_images", "loop.summary_images"),
    ("train.eval_every_steps", "loop.eval_every_steps"),
    ("train.eval_steps", "loop.eval_steps"),
    ("train.eval_batch_size", "loop.eval_batch_size"),
    ("train.resume_input", "loop.resume_input"),
)


# Fields that went, with the one that replaced them: before issue 11 the evaluation section
# repeated the run's evaluation attack's step size and random start (which took precedence).
DROPPED = (("evaluation.attack_step_size", "eval_attack.step_size"),
           ("evaluation.random_start", "eval_attack.random_start"))


def _upgrade(d: dict) -> dict:
    """``d`` in today's layout: fields of :data:`MOVED` go to their new place, those of
    :data:`DROPPED` are left out."""
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    for old, new in MOVED:
        (old_section, old_name), (new_section, new_name) = old.split("."), new.split(".")
        if isinstance(d.get(old_section), dict) and old_name in d[old_section]:
            d.setdefault(new_section, {})[new_name] = d[old_section].pop(old_name)
    for old, _ in DROPPED:
        section, name = old.split(".")
        if isinstance(d.get(section), dict):
            d[section].pop(name, None)
    return d


def _section_from_dict(cls, d: dict):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise UserError(f"Unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}.")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    return cls(**kwargs)


def set_field(exp: Experiment, path: str, value) -> None:
    """Sets ``section.field`` (or a top-level field) on ``exp``; unknown paths are an error."""
    parts = path.split(".")
    obj = exp
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            where = ".".join(parts[:i]) or "Experiment"
            raise UserError(f"Unknown config field {path!r}: {where} has {', '.join(names)}.")
        if i == len(parts) - 1:
            setattr(obj, part, value)
        else:
            obj = getattr(obj, part)


def field_type(path: str) -> str:
    """The type annotation of the field at dotted ``path`` (e.g. ``"float | None"``)."""
    obj = Experiment
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if part not in fields:
            where = ".".join(parts[:i]) or "Experiment"
            raise UserError(f"Unknown config field {path!r}: {where} has "
                            f"{', '.join(fields)}.")
        annotation = fields[part].type
        if i < len(parts) - 1:
            obj = _SECTION_TYPES.get(part)
            if obj is None:
                raise UserError(f"Unknown config field {path!r}: {part} has no fields.")
    return annotation


def parse_value(path: str, text: str):
    """``text`` read as the type of the field at ``path``: ``none`` for an optional field,
    ``true``/``false`` for booleans, comma-separated items for tuples."""
    annotation = field_type(path)
    kinds = [k.strip() for k in annotation.split("|")]
    if "None" in kinds and text.strip().lower() in ("none", "null", ""):
        return None
    kind = next(k for k in kinds if k != "None")
    try:
        if kind.startswith("tuple["):
            item = kind[len("tuple["):].split(",")[0].strip()
            return tuple(_scalar(item, t) for t in text.split(",") if t.strip())
        return _scalar(kind, text)
    except ValueError:
        raise UserError(f"Invalid value {text!r} for {path}; it must be of type "
                        f"{annotation}.") from None


def _scalar(kind: str, text: str):
    text = text.strip()
    if kind == "bool":
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(text)
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    return text


def parse_override(text: str) -> tuple[str, Any]:
    """``"section.field=value"`` -> (path, value of the field's type)."""
    path, sep, value = text.partition("=")
    if not sep or not path.strip():
        raise UserError(f"Invalid override {text!r}; write section.field=value, e.g. "
                        "optimizer.momentum=0.95.")
    path = path.strip()
    return path, parse_value(path, value)
