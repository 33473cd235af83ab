"""The quick start: adversarially train ReLU and SiLU networks on real digits, print a table.

    python run/quickstart.py --model_dir=/tmp/sat-quickstart

Trains the presets digits-relu and digits-silu (WRN-10-2 on scikit-learn's handwritten
digits, 16x16, epsilon 16 of 255; nothing is downloaded) one after the other, each in
<model_dir>/<preset>, then prints clean and PGD-10 accuracy on the 359 held-out digits.
--baseline adds the same network trained without attacks (--noadversarial), to show what
adversarial training buys. Each run is an ordinary run/train.py run directory: re-running
resumes (or, when finished, just prints), and run/eval.py and run/export.py take it.

Bad flag values fail with a one-line message and exit status 2 before TensorFlow is imported.
"""
from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import flags  # noqa: E402

from sat_tf import cli, experiments, names  # noqa: E402
from sat_tf.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Parent folder of the runs (one sub-folder per preset).")
flags.DEFINE_list("activations", ["relu", "silu"], "Activations to train (presets digits-<name>: "
                  "relu, silu), or any of " + ", ".join(names.ACTIVATIONS) + ".")
flags.DEFINE_bool("baseline", False, "Also train the first activation without attacks.")
flags.DEFINE_integer("train_epochs", None, "Epochs per run (default: the presets' 15).")


def runs_from_flags() -> list:
    """``[(label, experiment)]`` to train, validated (TF-free)."""
    if not FLAGS.model_dir:
        raise UserError("--model_dir is required (the runs go in sub-folders of it).")
    if not FLAGS.activations:
        raise UserError("Invalid --activations ''; give at least one, e.g. relu,silu.")
    if FLAGS.train_epochs is not None and FLAGS.train_epochs <= 0:
        raise UserError(f"Invalid --train_epochs {FLAGS.train_epochs}; it must be > 0.")
    runs = []
    plan = [(a, True) for a in FLAGS.activations]
    if FLAGS.baseline:
        plan.append((FLAGS.activations[0], False))
    for activation, adversarial in plan:
        activation = names.activation(activation)
        exp = experiments.get("digits-relu").replace(**{"model.activation": activation})
        exp.name = f"digits-{activation}"
        folder = exp.name if adversarial else f"{exp.name}-clean-training"
        overrides = {"model_dir": os.path.join(FLAGS.model_dir, folder),
                     "train.adversarial": adversarial}
        if FLAGS.train_epochs is not None:
            overrides["train.train_epochs"] = float(FLAGS.train_epochs)
        exp = exp.replace(**overrides)
        exp.validate()
        label = f"{activation}, {'adversarial' if adversarial else 'clean'} training"
        runs.append((label, exp))
    return runs


def main(argv):
    runs = cli.start("quickstart.py", argv, runs_from_flags, quiet_logging=True)
    from sat_tf import training

    rows = []
    for label, exp in runs:
        print(f"== {label}: {exp.model_dir}", flush=True)
        trainer = training.Trainer(exp, log=lambda line: print(line, flush=True))
        result = trainer.train()
        ev = result["eval"]
        if result["status"] != "completed" or ev is None:
            print(f"quickstart.py: {label} {result['status']} at step {result['step']}; run "
                  "the same command again to resume.", flush=True)
            sys.exit(0)
        rows.append((label, ev["clean_top1"], ev["attacks"][0]["accuracy"], ev["examples"]))
    attack = runs[0][1].eval_attack
    pgd = f"PGD-{attack.num_steps} eps {attack.epsilon:g}"
    header = "WRN-10-2 on digits"
    width = max(len(header), *(len(r[0]) for r in rows))
    print(f"\n{header:<{width}}  clean top-1  {pgd}", flush=True)
    for label, clean, robust, examples in rows:
        print(f"{label:<{width}}  {clean:11.1%}  {robust:{len(pgd)}.1%}", flush=True)
    print(f"({rows[0][3]} held-out digits; run/eval.py --model_dir=<run> for more attacks)",
          flush=True)


if __name__ == "__main__":
    cli.run(main, "quickstart.py")
