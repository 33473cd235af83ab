"""Training-step time: clean vs PGD-k adversarial steps, ReLU vs SiLU vs GELU, with and
without XLA, in one process on the same model and batch.

    python bench/step_time.py                                   # resnet-18, 32x32, batch 32
    python bench/step_time.py --model=resnet-50 --image_size=224 --batch_size=64
    python bench/step_time.py --batch_norm=fused,keras --jit=off     # the fused kernel's gain

Every configuration is a real :class:`sat_tf.training.Trainer` step (attack, training-mode
forward, loss, gradients, optimizer update; without the once-per-loop clean-accuracy
measurement) run ``--steps`` times per host round trip on a fixed batch. All
configurations are compiled first and then timed round-robin, keeping each one's fastest
round (robust to load from other processes); the table gives the time per step and its
ratio to the clean ReLU step with the same XLA and batch-norm setting. ``--batch_norm=keras``
times Keras' own batch normalization instead of the fused kernel (sat_tf.batch_norm). Targets (DESIGN.md): a PGD-1 step
at most 1.7x the clean step (the attack adds one forward and one input-gradient backward,
no weight gradients) and a SiLU step at most 1.05x the ReLU step.
"""
from __future__ import annotations

import os
import pathlib
import platform
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet-18", "Model name.")
flags.DEFINE_integer("image_size", 32, "Image size.")
flags.DEFINE_integer("num_classes", 10, "Classes.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_list("activations", ["relu", "silu", "gelu"], "Activations to compare.")
flags.DEFINE_list("attack_steps", ["1", "2", "4"],
                  "PGD steps to time (ReLU: all; other activations: the first).")
flags.DEFINE_enum("jit", "both", ["off", "on", "both"], "XLA settings to time.")
flags.DEFINE_list("batch_norm", ["fused"], "Batch normalization to time: fused (sat-tf's, on "
                  "FusedBatchNormV3), keras (Keras' own ops).")
flags.DEFINE_integer("steps", 5, "Steps per timed host round trip.")
flags.DEFINE_integer("repeats", 5, "Timed rounds over all configurations (the fastest is kept).")


def _configs():
    ks = [int(k) for k in FLAGS.attack_steps]
    jits = {"off": [False], "on": [True], "both": [False, True]}[FLAGS.jit]
    out = []
    for bn in FLAGS.batch_norm:
        for jit in jits:
            for i, act in enumerate(FLAGS.activations):
                out.append((bn, act, 0, jit))
                for k in (ks if i == 0 else ks[:1]):
                    out.append((bn, act, k, jit))
    return out


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.set_verbosity(logging.ERROR)  # one Trainer per configuration: retracing is expected
    import tensorflow as tf

    from sat_tf import batch_norm, training
    from sat_tf.config import (AttackConfig, DataConfig, Experiment, LoopConfig, ModelConfig,
                               RuntimeConfig, ScheduleConfig, TrainConfig)

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0" if not tf.config.list_physical_devices(
        "GPU") else "/gpu:0")
    b, s = FLAGS.batch_size, FLAGS.image_size
    images = tf.random.stateless_uniform([b, s, s, 3], [1, 2], 0.0, 255.0)
    labels = tf.random.stateless_uniform([b], [3, 4], 0, FLAGS.num_classes, dtype=tf.int32)
    batch = tf.data.Dataset.from_tensors((images, labels)).repeat()
    n = tf.constant(FLAGS.steps, tf.int32)

    # Build and compile every configuration first, then time them round-robin, so that load
    # from other processes falls on all of them alike; keep each one's fastest round.
    runs = []
    fusable = batch_norm.BatchNormalization._fusable
    for bn, act, k, jit in _configs():
        if bn not in ("fused", "keras"):
            raise app.UsageError(f"Invalid --batch_norm {bn!r}; valid choices: fused, keras.")
        # The layer decides at trace time, which the first run below does.
        batch_norm.BatchNormalization._fusable = (
            fusable if bn == "fused" else lambda self, inputs, training, mask: False)
        exp = Experiment(
            model=ModelConfig(name=FLAGS.model, activation=act, image_size=s,
                              num_classes=FLAGS.num_classes),
            data=DataConfig(dataset="synthetic", synthetic_image_size=s,
                            synthetic_num_classes=FLAGS.num_classes),
            train_attack=AttackConfig(epsilon=4.0, step_size=4.0, num_steps=max(k, 1),
                                      random_start=True, clean_start_prob=0.2),
            train=TrainConfig(adversarial=k > 0, global_batch_size=b, train_steps=1000),
            schedule=ScheduleConfig(warmup_epochs=0.0), loop=LoopConfig(summary_images=0),
            runtime=RuntimeConfig(strategy="one_device", jit_compile=jit),
            model_dir=tempfile.mkdtemp(prefix="sat_bench_"))
        trainer = training.Trainer(exp, strategy=strategy, log=lambda _: None)
        iterator = iter(strategy.experimental_distribute_dataset(batch))
        t0 = time.time()
        trainer.run_steps(iterator, n, measure=False)
        trainer.step.numpy()
        print(f"  compiled {bn} {act} {'clean' if k == 0 else f'PGD-{k}'} "
              f"jit={'on' if jit else 'off'} in {time.time() - t0:.1f} s", file=sys.stderr,
              flush=True)
        runs.append(((bn, act, k, jit), trainer, iterator, []))
    batch_norm.BatchNormalization._fusable = fusable
    for r in range(FLAGS.repeats):
        for _, trainer, iterator, times in runs:
            t0 = time.time()
            trainer.run_steps(iterator, n, measure=False)
            trainer.step.numpy()
            times.append((time.time() - t0) / FLAGS.steps)
        print(f"  round {r + 1}/{FLAGS.repeats} done", file=sys.stderr, flush=True)
    rows = [(bn, act, k, jit, 1000 * min(times)) for (bn, act, k, jit), _, _, times in runs]

    first = FLAGS.activations[0]
    clean_relu = {(bn, jit): ms for bn, act, k, jit, ms in rows if act == first and k == 0}
    clean_same = {(bn, act, jit): ms for bn, act, k, jit, ms in rows if k == 0}
    by_key = {(bn, act, k, jit): ms for bn, act, k, jit, ms in rows}
    device = "GPU" if tf.config.list_physical_devices("GPU") else (
        f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    print(f"\nStep time: {FLAGS.model}, {s}x{s}, batch {b}, {FLAGS.num_classes} classes, one "
          f"{device}, TF {tf.__version__}; per step, best of {FLAGS.repeats} rounds of "
          f"{FLAGS.steps} steps.\n")
    both = len(FLAGS.batch_norm) > 1
    print(f"| batch norm | activation | step  | XLA | ms/step | x clean {first} | "
          "x clean, same activation |" + (" x keras batch norm |" if both else ""))
    print("|---|---|---|---|---:|---:|---:|" + ("---:|" if both else ""))
    for bn, act, k, jit, ms in rows:
        keras_ms = by_key.get(("keras", act, k, jit))
        print(f"| {bn} | {act} | {'clean' if k == 0 else f'PGD-{k}'} | {'on' if jit else 'off'} | "
              f"{ms:.1f} | {ms / clean_relu[(bn, jit)]:.2f} | "
              f"{ms / clean_same[(bn, act, jit)]:.2f} |"
              + (f" {ms / keras_ms:.2f} |" if both and keras_ms else (" |" if both else "")))
    print()
    for bn, jit in sorted(clean_relu):
        tag = f"{bn} batch norm, XLA {'on' if jit else 'off'}"
        relu = {k: ms for b, act, k, j, ms in rows if b == bn and act == first and j == jit}
        k1 = int(FLAGS.attack_steps[0])
        line = f"{tag}: PGD-{k1}/clean ({FLAGS.activations[0]}) = {relu[k1] / relu[0]:.2f} " \
               "(target <= 1.7)"
        for act in FLAGS.activations[1:]:
            other = {k: ms for b, a, k, j, ms in rows if b == bn and a == act and j == jit}
            line += (f"; {act}/{FLAGS.activations[0]}: clean {other[0] / relu[0]:.2f}, "
                     f"PGD-{k1} {other[k1] / relu[k1]:.2f}")
        print(line + " (target <= 1.05 for silu)")
    # With many XLA-compiled trainers in one process, TensorFlow's teardown at interpreter
    # exit sometimes deadlocks (seen with TF 2.21 on CPU); everything is printed, so skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    app.run(main)
