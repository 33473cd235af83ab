"""Smooth Adversarial Training from the command line.

    python run/train.py --experiment=imagenet-resnet50-silu --tpu=local
        --data_dir=gs://BUCKET/imagenet --model_dir=gs://BUCKET/r50-silu
    python run/train.py --dataset=synthetic --model=resnet-18 --activation=silu
        --train_batch_size=32 --train_steps=20 --strategy=mirrored --logical_cpus=2
        --model_dir=/tmp/sat-smoke

--experiment picks a named preset (python run/experiments.py list); every flag given
explicitly overrides the preset's field. Without --experiment, --dataset=cifar10 starts
from the CIFAR-10 protocol of the cifar10-* presets (epsilon 8, PGD-10 training, CIFAR
recipe); other datasets from the paper's ImageNet protocol (epsilon 4, PGD-1 training from a
random start) with the ResNet or EfficientNet recipe, following the model. Re-running the
same command resumes from the latest checkpoint in --model_dir; SIGTERM saves a checkpoint
and exits with status 0. --init_from=RUN_DIR starts from another run's weights (fine-tuning,
e.g. a release imported by run/import_checkpoint.py), with that run's model unless flags
change it.

Bad flag values fail in well under a second, with a one-line message and exit status 2,
before TensorFlow is imported.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import flags  # noqa: E402

from sat_tf import cli, config, experiments, names, recipes  # noqa: E402
from sat_tf import data as data_lib  # noqa: E402
from sat_tf.errors import UserError  # noqa: E402
from sat_tf.config import (DATASETS, LR_SCHEDULES, MIXED_PRECISION, OPTIMIZERS,  # noqa: E402
                           PREPROCESSINGS, RESUME_INPUT, STRATEGIES, DataConfig, Experiment,
                           ModelConfig)

FLAGS = flags.FLAGS

flags.DEFINE_string("experiment", None, "A named preset (python run/experiments.py list); the "
                    "other flags override its fields.")
flags.DEFINE_multi_string(
    "set", [], "Any config field by its dotted path, e.g. --set=optimizer.momentum=0.95 "
    "--set=schedule.decay_boundaries=30,60,80 --set=train.ema_decay=none (the sections and "
    "fields are those of experiment.json); applied after the named flags.")
flags.DEFINE_bool("use_bfloat16", None, "The TPU code's flag: --use_bfloat16 is "
                  "--mixed_precision=mixed_bfloat16, --nouse_bfloat16 is --mixed_precision=none.")

# (flag, config paths it sets, help): named shortcuts for the fields most runs set. The flag's
# type is its field's. Every flag defaults to None: "not given", so a preset's value stands
# unless the flag is given.
_FLAGS = [
    # model
    ("model", ("model.name",), f"Model: {names.MODEL_NAMES_HELP}."),
    ("activation", ("model.activation",),
     f"Activation (forward and backward): {', '.join(names.ACTIVATIONS)}; swish = silu."),
    ("image_size", ("model.image_size",),
     "Input resolution (default: the dataset's, else the model's, e.g. EfficientNet's table)."),
    ("num_classes", ("model.num_classes",),
     "Classes of the model's head, at least the data's (default: the dataset's, from "
     "conversion.json for a converted folder; with --dataset=synthetic it sets the dataset's "
     "too)."),
    ("dropout_rate", ("model.dropout_rate",),
     "Dropout before the classifier (default: the model's, EfficientNet's table)."),
    ("drop_connect_rate", ("model.drop_connect_rate",),
     "EfficientNet stochastic-depth rate (default 0.2)."),
    # data
    ("dataset", ("data.dataset",),
     f"Dataset: {', '.join(DATASETS)} (images: any folder run/make_tfrecords.py converted; "
     "default: what --data_dir's conversion.json records, imagenet for a folder without one, "
     "else synthetic)."),
    ("data_dir", ("data.data_dir",),
     "TFRecord folder (local or gs://) or TFDS data_dir."),
    ("preprocessing", ("data.preprocessing",),
     f"imagenet/images folders: {', '.join(PREPROCESSINGS)} (imagenet: random-resized crop, "
     "centre crop for evaluation; resize: the whole image; cifar: the whole image, pad-4 crop "
     "and flip). Default: resize for images of at most 64 px, else imagenet."),
    ("label_base", ("data.label_base",),
     "The first label in the TFRecords: 1 (official format, default) or 0."),
    ("num_eval_images", ("data.num_eval_examples",),
     "Evaluation-split size (default: conversion.json's, else the dataset's)."),
    ("data_source", ("data.source",),
     "Where the data comes from: tfrecord or tfds (default: tfds for cifar10, tfrecord for "
     "imagenet)."),
    ("manual_dir", ("data.manual_dir",),
     "TFDS imagenet2012: the folder holding the ILSVRC2012 tar files."),
    ("augment", ("data.augment",),
     "ImageNet training augmentation on top of crop+flip: none, randaugment, autoaugment."),
    ("randaugment_layers", ("data.randaugment_layers",), "RandAugment N (default 2)."),
    ("randaugment_magnitude", ("data.randaugment_magnitude",),
     "RandAugment M, 0-30 (default 10)."),
    ("cifar_padding", ("data.cifar_padding",),
     "CIFAR-10 training crop padding: reflect or zero."),
    ("shuffle_buffer", ("data.shuffle_buffer",), "Shuffle buffer (records per host)."),
    ("num_parallel_reads", ("data.num_parallel_reads",),
     "TFRecord files read at once per host."),
    ("skip_corrupt", ("data.skip_corrupt",),
     "Skip (and count, on stderr) corrupt records / undecodable images instead of failing with "
     "an error that names the file."),
    ("cache_eval", ("data.cache_eval",),
     "Keep the decoded evaluation images in memory after the first evaluation."),
    ("synthetic_train_examples", ("data.synthetic_train_examples",),
     "--dataset=synthetic: examples in the training split (default 1024)."),
    ("synthetic_eval_examples", ("data.synthetic_eval_examples",),
     "--dataset=synthetic: examples in the evaluation split (default 256)."),
    ("num_train_images", ("data.num_train_examples",),
     "Training-set size used for epochs and the schedule (default: conversion.json's, else "
     "the dataset's)."),
    # model_dir
    ("model_dir", ("model_dir",),
     "Where checkpoints, TensorBoard summaries and experiment.json go (local or gs://); "
     "re-running with the same model_dir resumes."),
    # schedule and optimizer
    ("train_batch_size", ("train.global_batch_size",),
     "Global batch size, split evenly over the replicas."),
    ("train_epochs", ("train.train_epochs",), "Training length in epochs."),
    ("train_steps", ("train.train_steps",),
     "Training length in steps (instead of --train_epochs)."),
    ("optimizer", ("optimizer.name",), f"Optimizer: {', '.join(OPTIMIZERS)}."),
    ("base_learning_rate", ("schedule.base_learning_rate",),
     "Learning rate per 256 images; scaled by train_batch_size / 256."),
    ("lr_schedule", ("schedule.name",),
     f"Learning-rate schedule after the warm-up: {', '.join(LR_SCHEDULES)}."),
    ("warmup_epochs", ("schedule.warmup_epochs",), "Linear warm-up length in epochs."),
    ("momentum", ("optimizer.momentum",), "Momentum of SGD / RMSProp (Adam's beta_1)."),
    ("weight_decay", ("optimizer.weight_decay",),
     "L2 weight decay, wd * 0.5 * sum(w^2) over the non-batch-norm weights."),
    ("label_smoothing", ("train.label_smoothing",), "Label smoothing of the loss."),
    ("ema_decay", ("train.ema_decay",),
     "Exponential moving average of the weights (e.g. 0.9999), used for evaluation; "
     "0 turns it off."),
    ("seed", ("train.seed",),
     "Seed of the initial weights and the attack's random starts."),
    ("init_from", ("train.init_from",),
     "Fine-tune: start from the weights of this run directory (a training run, or a release "
     "imported by run/import_checkpoint.py; its EMA weights when it kept them). The model "
     "section is that run's unless flags change it; on another dataset the class count and "
     "image size are the data's, and another class count gets a fresh classifier. Ignored "
     "once --model_dir holds checkpoints (the run resumes)."),
    # attack
    ("adversarial", ("train.adversarial",),
     "Adversarial training (--noadversarial: clean training with the same code)."),
    ("attack_epsilon", ("train_attack.epsilon", "eval_attack.epsilon"),
     "L-infinity radius in pixels of [0, 255] (4 = 4/255), for training and evaluation "
     "(also recorded as run/eval.py's default)."),
    ("attack_step_size", ("train_attack.step_size",),
     "Training attack step size in pixels (default: the protocol's, scaled by "
     "--attack_epsilon / the protocol's epsilon)."),
    ("attack_steps", ("train_attack.num_steps",), "Training attack PGD steps."),
    ("attack_clean_start_prob", ("train_attack.clean_start_prob",),
     "Probability that a training batch's attack starts from the clean image (else random)."),
    ("attacker_backward", ("train_attack.backward",),
     "Table 1: the backward rule of the activations while the training attack computes its "
     f"gradient: natural, {', '.join(names.BACKWARD_RULES)}."),
    ("optimizer_backward", ("train.optimizer_backward",),
     "Table 1: the backward rule of the activations in the weight gradient."),
    # periodic evaluation
    ("eval_every_steps", ("loop.eval_every_steps",),
     "Evaluate (clean + PGD on the validation split) every this many steps; always at the end."),
    ("eval_steps", ("loop.eval_steps",),
     "Batches per evaluation (default: the whole split)."),
    ("eval_batch_size", ("loop.eval_batch_size",),
     "Global evaluation batch size (default: train_batch_size)."),
    ("eval_attack_steps", ("eval_attack.num_steps",), "Evaluation PGD steps."),
    ("eval_attack_step_size", ("eval_attack.step_size",),
     "Evaluation PGD step size in pixels (default: the protocol's, 1 at epsilon 4, scaled "
     "by --attack_epsilon / the protocol's epsilon)."),
    # loop, checkpoints, summaries
    ("steps_per_loop", ("loop.steps_per_loop",),
     "Steps run on the device per host round trip (the TPU code's iterations_per_loop)."),
    ("checkpoint_every_steps", ("loop.checkpoint_every_steps",),
     "Checkpoint interval in steps."),
    ("keep_checkpoint_max", ("loop.max_checkpoints_to_keep",),
     "Checkpoints kept."),
    ("summary_every_steps", ("loop.summary_every_steps",),
     "Interval of the console progress line and the TensorBoard summaries."),
    ("resume_input", ("loop.resume_input",),
     f"How a resumed run positions its input: {', '.join(RESUME_INPUT)} (skip replays the "
     "consumed batches: exact, slower to start)."),
    # runtime
    ("tpu", ("runtime.tpu",),
     "TPU name, grpc:// address, or 'local' on a TPU VM; implies --strategy=tpu."),
    ("strategy", ("runtime.strategy",), f"Distribution: {', '.join(STRATEGIES)}."),
    ("num_gpus", ("runtime.num_gpus",),
     "mirrored: use the first N GPUs (default: all)."),
    ("logical_cpus", ("runtime.logical_cpus",),
     "Split the CPU into N logical devices, so --strategy=mirrored runs N replicas on a "
     "CPU-only machine (testing)."),
    ("mixed_precision", ("runtime.mixed_precision",),
     f"Keras mixed-precision policy: {', '.join(MIXED_PRECISION)} (auto: mixed_bfloat16 on a "
     "TPU, as the TPU code trains; none elsewhere)."),
    ("jit_compile", ("runtime.jit_compile",),
     "Compile the attack + forward + backward with XLA."),
    ("deterministic", ("runtime.deterministic",),
     "Enable TensorFlow op determinism (bitwise-reproducible runs, slower)."),
    ("peer_timeout_seconds", ("runtime.peer_timeout_seconds",),
     "multi_worker: how long each worker waits at start-up for all workers of TF_CONFIG's "
     "cluster before failing (default 900)."),
]
_ALIASES = {"moving_average_decay": "ema_decay", "iterations_per_loop": "steps_per_loop",
            "train_batch": "train_batch_size"}

_DEFINE = {"str": flags.DEFINE_string, "int": flags.DEFINE_integer,
           "float": flags.DEFINE_float, "bool": flags.DEFINE_bool}
for _name, _paths, _help in _FLAGS:
    _kind = next(k.strip() for k in config.field_type(_paths[0]).split("|") if k.strip() != "None")
    _DEFINE[_kind](_name, None, _help)
for _alias, _target in _ALIASES.items():
    flags.DEFINE_alias(_alias, _target)


def _given(name: str):
    return getattr(FLAGS, name)


# The presets whose data, attacks and recipe --dataset=NAME starts from.
PROTOCOLS = {"cifar10": "cifar10-resnet18-relu", "digits": "digits-relu"}


def dataset_from_flags() -> tuple[str, str | None]:
    """``(dataset, source)``: --dataset; else, with --data_dir, the dataset its
    conversion.json records (a folder without one: official ImageNet shards); else the
    default (synthetic). ``source`` is "tfrecord" for a converted CIFAR-10 folder."""
    if _given("dataset") is not None or _given("experiment") is not None:
        return _given("dataset"), None
    data_dir = _given("data_dir")
    if not data_dir or "://" in data_dir:
        return ("imagenet" if data_dir else None), None
    manifest = data_lib.read_metadata(data_dir)
    if manifest is None:
        return "imagenet", None
    dataset = manifest.get("dataset")
    if dataset not in DATASETS:
        raise UserError(f"{manifest['_path']} records dataset {dataset!r}; give --dataset "
                        f"({', '.join(DATASETS)}).")
    return dataset, ("tfrecord" if dataset == "cifar10" else None)


def init_experiment() -> Experiment | None:
    """--init_from's run (TF-free; None without --init_from)."""
    if _given("init_from") is None:
        return None
    from sat_tf import loading
    try:
        source = loading.resolve(model_dir=_given("init_from"))
    except UserError as e:
        raise UserError(f"--init_from: {e}") from None
    if source.experiment is None:      # a bucket: read when training starts
        raise UserError(f"--init_from {_given('init_from')!r}: give a local run directory (its "
                        "model section is read before TensorFlow starts).")
    return source.experiment


def base_experiment(dataset: str | None) -> Experiment:
    """The preset --experiment names; else, for --dataset=cifar10 or digits, the protocol of
    that dataset's presets; else the paper's ImageNet protocol with the recipe of the model
    (--model's, else --init_from's)."""
    if _given("experiment") is not None:
        return experiments.get(_given("experiment"))
    inherited = init_experiment()
    model = _given("model") or (inherited.model.name if inherited else ModelConfig().name)
    dataset = dataset or DataConfig().dataset
    if dataset in PROTOCOLS:
        exp = experiments.get(PROTOCOLS[dataset])
        exp.name, exp.paper = "custom", {}
        exp.description = f"The {dataset} protocol of preset {PROTOCOLS[dataset]}."
        return exp
    return Experiment(name="custom", **recipes.for_model(model).sections())


def experiment_from_flags() -> Experiment:
    """The experiment the command line describes (TF-free; UserError on bad values)."""
    dataset, source = dataset_from_flags()
    exp = base_experiment(dataset)
    overrides = {}
    inherited = init_experiment()
    if inherited is not None:
        if _given("experiment") is not None and exp.model.name != inherited.model.name:
            raise UserError(f"--experiment={_given('experiment')} trains {exp.model.name}, "
                            f"--init_from holds {inherited.model.name}.")
        # The model is the one whose weights start the run; flags below may change it. On
        # other data, the class count and image size are the data's (a fresh classifier).
        other_data = (overrides.get("data.dataset") or _given("dataset") or exp.data.dataset
                      ) != inherited.data.dataset
        for field, value in dataclasses.asdict(inherited.model).items():
            if not (other_data and field in ("num_classes", "image_size")):
                overrides[f"model.{field}"] = value
    if dataset is not None and _given("dataset") is None:
        overrides["data.dataset"] = dataset
    if source is not None and _given("data_source") is None:
        overrides["data.source"] = source
    for name, paths, _help in _FLAGS:
        value = _given(name)
        if value is None:
            continue
        if name == "ema_decay" and value == 0:
            value = None
        for path in paths:
            overrides[path] = value
    for item in FLAGS.set:
        path, value = config.parse_override(item)
        overrides[path] = value
    # The length is one of steps / epochs: the one given replaces the preset's other.
    steps, epochs = overrides.get("train.train_steps"), overrides.get("train.train_epochs")
    if steps is not None and epochs is not None:
        raise UserError("Give --train_steps or --train_epochs, not both.")
    if steps is not None:
        overrides["train.train_epochs"] = None
    if epochs is not None:
        overrides["train.train_steps"] = None
    if _given("use_bfloat16") is not None:
        policy = "mixed_bfloat16" if _given("use_bfloat16") else "none"
        if _given("mixed_precision") not in (None, policy):
            raise UserError(f"--{'' if _given('use_bfloat16') else 'no'}use_bfloat16 "
                            f"contradicts --mixed_precision={_given('mixed_precision')}.")
        overrides["runtime.mixed_precision"] = policy
    if _given("num_classes") is not None and (_given("dataset") or exp.data.dataset) == "synthetic":
        overrides["data.synthetic_num_classes"] = _given("num_classes")
    if _given("attack_epsilon") is not None:
        # Step sizes keep their ratio to epsilon unless given: PGD-10 with step 1 cannot even
        # reach the boundary of an epsilon-16 ball.
        for attack, flag in (("train_attack", "attack_step_size"),
                             ("eval_attack", "eval_attack_step_size")):
            old = getattr(exp, attack)
            if _given(flag) is None and old.epsilon > 0:
                scaled = old.step_size * _given("attack_epsilon") / old.epsilon
                overrides[f"{attack}.step_size"] = scaled
    if _given("tpu") and _given("strategy") is None:
        overrides["runtime.strategy"] = "tpu"
    exp = exp.replace(**overrides)
    if not exp.model_dir:
        raise UserError("--model_dir is required (where checkpoints and summaries go).")
    exp.validate()
    check_model_dir(exp.model_dir)
    return exp


def check_model_dir(model_dir: str) -> None:
    """Creates a local model_dir and checks it is writable (remote paths: TF checks later)."""
    if "://" in model_dir:
        return
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"model_dir {model_dir!r} cannot be created: {e.strerror}.") from None
    if not os.access(model_dir, os.W_OK):
        raise UserError(f"model_dir {model_dir!r} is not writable.")


def main(argv):
    exp = cli.start("train.py", argv, experiment_from_flags, quiet_logging=True)
    from sat_tf import distribute, training   # only now TensorFlow

    try:
        strategy = distribute.strategy_from_config(exp.runtime, seed=exp.train.seed)
        trainer = training.Trainer(exp, strategy=strategy,
                                   log=lambda line: print(line, flush=True))
    except UserError as e:      # found on building: the data's facts, memory
        cli.fail("train.py", str(e))
    import tensorflow as tf
    from sat_tf import memory
    try:
        result = trainer.train()
    except training.TrainingDiverged as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(1)
    except tf.errors.ResourceExhaustedError:
        if os.environ.get("SAT_TF_TRACEBACK"):
            raise
        cli.fail("train.py", "out of memory: " + memory.oom_advice(trainer.memory_estimate()),
                 status=1)
    line = f"{result['status']} at step {result['step']}/{trainer.total_steps}"
    if result["eval"]:
        ev = result["eval"]
        line += (f"; eval clean top-1 {ev['clean_top1']:.4f}, "
                 f"PGD-{exp.eval_attack.num_steps} {ev['attacks'][0]['accuracy']:.4f}")
    print(line, flush=True)


if __name__ == "__main__":
    cli.run(main, "train.py")
