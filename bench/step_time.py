"""Training-step time: clean vs PGD-k adversarial steps, ReLU vs SiLU vs GELU, with and
without XLA, in one process on the same model and batch.

    python bench/step_time.py                                   # resnet-18, 32x32, batch 32
    python bench/step_time.py --model=resnet-50 --image_size=224 --batch_size=64

Every configuration is a real :class:`sat_tf.training.Trainer` step (attack, training-mode
forward, loss, gradients, optimizer update; without the once-per-loop clean-accuracy
measurement) run ``--steps`` times per host round trip on a fixed batch. All
configurations are compiled first and then timed round-robin, keeping each one's fastest
round (robust to load from other processes); the table gives the time per step and its
ratio to the clean ReLU step with the same XLA setting. Targets (DESIGN.md): a PGD-1 step
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
flags.DEFINE_integer("steps", 5, "Steps per timed host round trip.")
flags.DEFINE_integer("repeats", 5, "Timed rounds over all configurations (the fastest is kept).")


def _configs():
    ks = [int(k) for k in FLAGS.attack_steps]
    jits = {"off": [False], "on": [True], "both": [False, True]}[FLAGS.jit]
    out = []
    for jit in jits:
        for i, act in enumerate(FLAGS.activations):
            out.append((act, 0, jit))
            for k in (ks if i == 0 else ks[:1]):
                out.append((act, k, jit))
    return out


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.set_verbosity(logging.ERROR)  # one Trainer per configuration: retracing is expected
    import tensorflow as tf

    from sat_tf import training
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
    for act, k, jit in _configs():
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
        print(f"  compiled {act} {'clean' if k == 0 else f'PGD-{k}'} "
              f"jit={'on' if jit else 'off'} in {time.time() - t0:.1f} s", file=sys.stderr,
              flush=True)
        runs.append(((act, k, jit), trainer, iterator, []))
    for r in range(FLAGS.repeats):
        for _, trainer, iterator, times in runs:
            t0 = time.time()
            trainer.run_steps(iterator, n, measure=False)
            trainer.step.numpy()
            times.append((time.time() - t0) / FLAGS.steps)
        print(f"  round {r + 1}/{FLAGS.repeats} done", file=sys.stderr, flush=True)
    rows = [(act, k, jit, 1000 * min(times)) for (act, k, jit), _, _, times in runs]

    clean_relu = {jit: ms for act, k, jit, ms in rows if act == FLAGS.activations[0] and k == 0}
    clean_same = {(act, jit): ms for act, k, jit, ms in rows if k == 0}
    device = "GPU" if tf.config.list_physical_devices("GPU") else (
        f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    print(f"\nStep time: {FLAGS.model}, {s}x{s}, batch {b}, {FLAGS.num_classes} classes, one "
          f"{device}, TF {tf.__version__}; per step, best of {FLAGS.repeats} rounds of "
          f"{FLAGS.steps} steps.\n")
    print(f"| activation | step  | XLA | ms/step | x clean {FLAGS.activations[0]} | "
          "x clean, same activation |")
    print("|---|---|---|---:|---:|---:|")
    for act, k, jit, ms in rows:
        print(f"| {act} | {'clean' if k == 0 else f'PGD-{k}'} | {'on' if jit else 'off'} | "
              f"{ms:.1f} | {ms / clean_relu[jit]:.2f} | {ms / clean_same[(act, jit)]:.2f} |")
    print()
    for jit in sorted(clean_relu):
        tag = "XLA on" if jit else "XLA off"
        relu = {k: ms for act, k, j, ms in rows if act == FLAGS.activations[0] and j == jit}
        k1 = int(FLAGS.attack_steps[0])
        line = f"{tag}: PGD-{k1}/clean ({FLAGS.activations[0]}) = {relu[k1] / relu[0]:.2f} " \
               "(target <= 1.7)"
        for act in FLAGS.activations[1:]:
            other = {k: ms for a, k, j, ms in rows if a == act and j == jit}
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
