"""Training-step time: clean vs PGD-k adversarial steps, ReLU vs SiLU vs GELU, with and
without XLA, in one process on the same model and batch.

    python bench/step_time.py                                   # resnet-18, 32x32, batch 32
    python bench/step_time.py --model=resnet-50 --image_size=224 --batch_size=64
    python bench/step_time.py --batch_norm=fused,keras --jit=off     # the fused kernel's gain
    python bench/step_time.py --model=resnet-50 --image_size=224 --num_classes=1000 \
        --batch_size=8 --activations=relu,silu --attack_steps=1 --jit=off --peer=torch --memory

Every configuration is a real :class:`sat_tf.training.Trainer` step (attack, training-mode
forward, loss, gradients, optimizer update; without the once-per-loop clean-accuracy
measurement) run ``--steps`` times per host round trip on a fixed batch. All
configurations are compiled first and then timed round-robin, keeping each one's fastest
round (robust to load from other processes); the table gives the time per step and its ratio to
the clean ReLU step with the same XLA and batch-norm setting. ``--batch_norm=keras`` times
Keras' own batch normalization instead of the fused kernel (sat_tf.batch_norm). Targets
(DESIGN.md): a PGD-1 step at most 1.7x the clean step (the attack adds one forward and one
input-gradient backward, no weight gradients) and a SiLU step at most 1.05x the ReLU step.

``--peer=torch`` (ResNets and ResNeXts, beside the XLA-off rows; needs ``pip install torch``)
also times the same network and step in PyTorch eager (``bench/torch_peer.py``) in the same
rounds, and gives sat-tf's throughput over PyTorch's. ``--memory`` runs every configuration
once more in a process of its own and reports the peak resident memory of its second step
(after the first traced the graph) and the peak's rise over the memory the process had before
its first step, i.e. the step's own memory: activations, gradients, optimizer slots, workspace
and what the first step kept.
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
flags.DEFINE_enum("peer", "none", ["none", "torch"], "Also time the same step in PyTorch eager.")
flags.DEFINE_bool("memory", False, "Also measure each configuration's peak memory, each in a "
                  "process of its own.")
flags.DEFINE_string("child", None, "Internal (--memory): run one configuration, "
                    "framework:batch_norm:activation:steps:jit, and print its memory.")


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


def _runs(configs, frameworks):
    """(framework, configuration) pairs: PyTorch once per activation and attack, beside the
    first batch-norm setting's XLA-off rows."""
    return [(fw, c) for fw in frameworks for c in configs
            if fw == "sat-tf" or (not c[3] and c[0] == configs[0][0])]


def _status_kib(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in KiB. Not
    getrusage's ru_maxrss: that survives exec, so a child would report its parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _batch(tf):
    b, s = FLAGS.batch_size, FLAGS.image_size
    images = tf.random.stateless_uniform([b, s, s, 3], [1, 2], 0.0, 255.0)
    labels = tf.random.stateless_uniform([b], [3, 4], 0, FLAGS.num_classes, dtype=tf.int32)
    return images, labels


def _ours(tf, strategy, config):
    """A callable that runs ``--steps`` sat-tf Trainer steps and waits for them."""
    from sat_tf import batch_norm, training
    from sat_tf.config import (AttackConfig, DataConfig, Experiment, LoopConfig, ModelConfig,
                               RuntimeConfig, ScheduleConfig, TrainConfig)
    bn, act, k, jit = config
    b, s = FLAGS.batch_size, FLAGS.image_size
    fusable = batch_norm.BatchNormalization._fusable
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
    iterator = iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(_batch(tf)).repeat()))
    n = tf.constant(FLAGS.steps, tf.int32)

    def run():
        trainer.run_steps(iterator, n, measure=False)
        trainer.step.numpy()
    run.restore = lambda: setattr(batch_norm.BatchNormalization, "_fusable", fusable)
    return run


def _theirs(tf, config):
    """A callable that runs ``--steps`` PyTorch peer steps (bench/torch_peer.py)."""
    import torch_peer

    from sat_tf import families, models
    _, act, k, _ = config
    spec = models.resolve(FLAGS.model, act, FLAGS.num_classes, image_size=FLAGS.image_size)
    family = families.FAMILIES[spec.family]
    model = torch_peer.ResNet(family.blocks(spec.args), stem=spec.stem, activation=act,
                              num_classes=FLAGS.num_classes)
    ours = family.count_params(spec.args, spec.stem, spec.num_classes)
    if torch_peer.num_params(model) != ours:
        raise SystemExit(f"step_time.py: the PyTorch peer has {torch_peer.num_params(model)} "
                         f"parameters, sat-tf's {FLAGS.model} {ours}: not the same network.")
    images, labels = _batch(tf)
    step = torch_peer.Step(model, images.numpy(), labels.numpy(), attack_steps=k)

    def run():
        for _ in range(FLAGS.steps):
            step()
    run.restore = lambda: None
    return run


def _check_flags():
    for bn in FLAGS.batch_norm:
        if bn not in ("fused", "keras"):
            raise app.UsageError(f"Invalid --batch_norm {bn!r}; valid choices: fused, keras.")
    if FLAGS.peer == "torch":
        from sat_tf import families
        from sat_tf.errors import UserError
        try:
            family = families.parse(FLAGS.model)[0].name
        except UserError as e:
            raise app.UsageError(str(e)) from None
        if family not in ("resnet", "resnext"):
            raise app.UsageError(f"Invalid --model {FLAGS.model!r} for --peer=torch; valid "
                                 "choices: resnet-<depth>, resnext-<depth>-<c>x<w>d.")
        for act in FLAGS.activations:
            if act not in ("relu", "silu", "gelu"):
                raise app.UsageError(f"Invalid --activations entry {act!r} for --peer=torch; "
                                     "valid choices: relu, silu, gelu.")
        try:
            import torch  # noqa: F401
        except ImportError:
            raise app.UsageError("--peer=torch needs PyTorch: pip install torch (the CPU build "
                                 "is enough).") from None


def _child(tf, strategy):
    """--memory: one configuration in this process; prints its memory as one JSON line."""
    import json
    framework, bn, act, k, jit = FLAGS.child.split(":")
    config = (bn, act, int(k), jit == "on")
    run = _ours(tf, strategy, config) if framework == "sat-tf" else _theirs(tf, config)
    before = _status_kib("VmRSS")
    run()  # traces (sat-tf); its one-off peak is not the step's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS now
    run()
    print(json.dumps({"before_mib": before / 1024, "peak_mib": _status_kib("VmHWM") / 1024}),
          flush=True)


def _memory(configs, frameworks):
    """Each configuration's memory, each measured in a child process of its own."""
    import json
    import subprocess
    out = {}
    args = [a for a in sys.argv[1:] if not a.startswith(("--memory", "--child", "--peer"))]
    for fw, (bn, act, k, jit) in _runs(configs, frameworks):
        key = f"{fw}:{bn}:{act}:{k}:{'on' if jit else 'off'}"
        proc = subprocess.run([sys.executable, __file__, *args, f"--child={key}", "--steps=1"],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"step_time.py: the memory run of {key} failed:\n"
                             f"{proc.stderr[-2000:]}")
        out[(fw, bn, act, k, jit)] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory of {key}: {out[(fw, bn, act, k, jit)]}", file=sys.stderr, flush=True)
    return out


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.set_verbosity(logging.ERROR)  # one Trainer per configuration: retracing is expected
    _check_flags()
    import tensorflow as tf

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0" if not tf.config.list_physical_devices(
        "GPU") else "/gpu:0")
    if FLAGS.child:
        _child(tf, strategy)
        sys.stdout.flush()
        os._exit(0)
    b, s = FLAGS.batch_size, FLAGS.image_size
    configs = _configs()
    frameworks = ["sat-tf"] + (["torch"] if FLAGS.peer == "torch" else [])

    # Build and compile every configuration first, then time them round-robin, so that load
    # from other processes falls on all of them alike; keep each one's fastest round.
    runs = []
    for fw, config in _runs(configs, frameworks):
        bn, act, k, jit = config
        t0 = time.time()
        run = _ours(tf, strategy, config) if fw == "sat-tf" else _theirs(tf, config)
        run()
        run.restore()
        print(f"  compiled {fw} {bn} {act} {'clean' if k == 0 else f'PGD-{k}'} "
              f"jit={'on' if jit else 'off'} in {time.time() - t0:.1f} s", file=sys.stderr,
              flush=True)
        runs.append(((fw, *config), run, []))
    for r in range(FLAGS.repeats):
        for _, run, times in runs:
            t0 = time.time()
            run()
            times.append((time.time() - t0) / FLAGS.steps)
        print(f"  round {r + 1}/{FLAGS.repeats} done", file=sys.stderr, flush=True)
    memory = _memory(configs, frameworks) if FLAGS.memory else {}
    ms = {key: 1000 * min(times) for key, _, times in runs}
    rows = [key[1:] + (t,) for key, t in ms.items() if key[0] == "sat-tf"]

    first = FLAGS.activations[0]
    clean_relu = {(bn, jit): t for bn, act, k, jit, t in rows if act == first and k == 0}
    clean_same = {(bn, act, jit): t for bn, act, k, jit, t in rows if k == 0}
    by_key = {(bn, act, k, jit): t for bn, act, k, jit, t in rows}
    device = "GPU" if tf.config.list_physical_devices("GPU") else (
        f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    print(f"\nStep time: {FLAGS.model}, {s}x{s}, batch {b}, {FLAGS.num_classes} classes, one "
          f"{device}, TF {tf.__version__}; per step, best of {FLAGS.repeats} rounds of "
          f"{FLAGS.steps} steps.\n")
    both = len(FLAGS.batch_norm) > 1
    peer = FLAGS.peer == "torch"
    if peer:
        import torch
        print(f"PyTorch {torch.__version__} eager ({torch.get_num_threads()} threads) in the "
              "same rounds; ÷ PyTorch is sat-tf's throughput over PyTorch's (> 1: sat-tf "
              "faster).\n")
    header = (f"| batch norm | activation | step  | XLA | ms/step | x clean {first} | "
              "x clean, same activation |" + (" x keras batch norm |" if both else "")
              + (" PyTorch ms/step | ÷ PyTorch |" if peer else "")
              + (" peak MiB | step MiB |" if memory else "")
              + (" PyTorch peak MiB | PyTorch step MiB |" if memory and peer else ""))
    print(header)
    print("|---|---|---|---|" + "---:|" * (header.count("|") - 5))

    def mem(fw, bn, act, k, jit):
        m = memory.get((fw, bn, act, k, jit))
        return f" {m['peak_mib']:.0f} | {m['peak_mib'] - m['before_mib']:.0f} |" if m else " | |"
    for bn, act, k, jit, t in rows:
        keras_ms = by_key.get(("keras", act, k, jit))
        line = (f"| {bn} | {act} | {'clean' if k == 0 else f'PGD-{k}'} | "
                f"{'on' if jit else 'off'} | {t:.1f} | {t / clean_relu[(bn, jit)]:.2f} | "
                f"{t / clean_same[(bn, act, jit)]:.2f} |"
                + (f" {t / keras_ms:.2f} |" if both and keras_ms else (" |" if both else "")))
        if peer:
            theirs = ms.get(("torch", bn, act, k, jit))
            line += f" {theirs:.1f} | {theirs / t:.2f} |" if theirs else " | |"
        if memory:
            line += mem("sat-tf", bn, act, k, jit)
            if peer:
                line += mem("torch", bn, act, k, jit)
        print(line)
    print()
    for bn, jit in sorted(clean_relu):
        tag = f"{bn} batch norm, XLA {'on' if jit else 'off'}"
        relu = {k: t for b, act, k, j, t in rows if b == bn and act == first and j == jit}
        k1 = int(FLAGS.attack_steps[0])
        line = f"{tag}: PGD-{k1}/clean ({FLAGS.activations[0]}) = {relu[k1] / relu[0]:.2f} " \
               "(target <= 1.7)"
        for act in FLAGS.activations[1:]:
            other = {k: t for b, a, k, j, t in rows if b == bn and a == act and j == jit}
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
