"""Robustness evaluation of a trained model (a training run or an exported SavedModel).

    python run/eval.py --model_dir=/tmp/sat --attack_steps=10,20,50,200
    python run/eval.py --model_dir=gs://.../r50-silu --data_dir=gs://.../imagenet --tpu=local
    python run/eval.py --saved_model=/tmp/sat-export --attack_epsilon=1,2,4,8,16 \
        --attack_mode=untargeted,targeted --attack_restarts=2

Runs clean top-1 / top-5 and each attack of --attacks (default pgd) over the whole validation
split: pgd for every combination of --attack_steps x --attack_epsilon x --attack_mode;
apgd-ce, apgd-t (--apgd_targets target classes, default 9) and autoattack (APGD-CE, APGD-T,
then Square, each stage on the examples still robust) for every --attack_steps (APGD
iterations) x --attack_epsilon; square (--square_queries) for every --attack_epsilon. Each is
repeated --attack_restarts times; an example counts as robust only if every attack failed on
it. The report gives the forward and backward passes each attack spent per example:

    python run/eval.py --model_dir=/tmp/sat --attacks=pgd,autoattack --attack_steps=20,100

Adds a PGD-20 attack at --sanity_epsilon (default 64) as a sanity check, kept out of the robust number. Prints a
table and writes a JSON report (--report; default: <model_dir>/eval_report_step<N>.json, or
eval_report.json in the current folder for --saved_model).

Defaults come from the run's experiment: its own evaluation attack (epsilon, step size, steps,
random start: what the run's evaluations used) added to its preset's evaluation protocol;
flags override, and the report's protocol says which values came from flags. The data is the
run's (its recorded split sizes and preprocessing); --data_dir etc. evaluate on other data.
A --model_dir evaluates the EMA weights when the run kept them (--noema: the raw weights).
A --saved_model is loaded with TensorFlow alone, without sat_tf's model code.

Bad flag values fail with a one-line message and exit status 2 before TensorFlow is imported.
Exit status 1 with --strict when a sanity check fails. The evaluation is
sat_tf.robustness.evaluate's; this program turns the flags into its request.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import flags  # noqa: E402

from sat_tf import cli, loading, reports, robustness  # noqa: E402
from sat_tf.config import (ATTACK_METHODS, ATTACK_MODES, DATA_SOURCES, DATASETS,  # noqa: E402
                           PREPROCESSINGS, STRATEGIES, RuntimeConfig)
from sat_tf.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
# Every flag defaults to None ("not given"): the experiment's value stands.
flags.DEFINE_string("model_dir", None, "A training run's model_dir (experiment.json + "
                    "checkpoints, local or gs://).")
flags.DEFINE_string("checkpoint", None, "A checkpoint path in --model_dir (default: the latest).")
flags.DEFINE_bool("use_ema", True, "Evaluate the EMA weights when the run kept them "
                  "(--noema / --nouse_ema: the raw weights).")
flags.DEFINE_alias("ema", "use_ema")
flags.DEFINE_string("saved_model", None, "An export of run/export.py (instead of --model_dir).")
flags.DEFINE_string("dataset", None, f"Dataset: {', '.join(DATASETS)} (default: the run's).")
flags.DEFINE_string("data_dir", None, "Data folder (default: the run's).")
flags.DEFINE_string("data_source", None, f"Data source: {', '.join(DATA_SOURCES)}.")
flags.DEFINE_string("preprocessing", None, f"imagenet/images folders: "
                    f"{', '.join(PREPROCESSINGS)} (default: the run's).")
flags.DEFINE_bool("skip_corrupt", None, "Skip (and count, on stderr) corrupt records / "
                  "undecodable images instead of failing with an error that names the file.")
flags.DEFINE_list("attack_steps", None, "PGD step counts, e.g. 10,20,50,200.")
flags.DEFINE_list("attack_epsilon", None, "L-infinity radii in pixels of [0, 255], e.g. "
                  "1,2,4,8,16.")
flags.DEFINE_float("attack_step_size", None, "PGD step size in pixels (paper: 1).")
flags.DEFINE_integer("attack_restarts", None, "Random restarts per attack (an example is "
                     "robust only if no restart fooled it).")
flags.DEFINE_list("attack_mode", None, f"Attack modes: {', '.join(ATTACK_MODES)} (targeted: a "
                  "random target class other than the label).")
flags.DEFINE_list("attacks", None, f"Attacks: {', '.join(ATTACK_METHODS)} (default pgd).")
flags.DEFINE_integer("square_queries", None, "Square's query budget, alone and in autoattack "
                     "(default 5000).")
flags.DEFINE_integer("apgd_targets", None, "APGD-T's target classes, alone and in autoattack: "
                     "the most likely wrong ones (default 9).")
flags.DEFINE_bool("random_start", None, "Start PGD from a uniform random point in the ball.")
flags.DEFINE_float("sanity_epsilon", None, "Epsilon of the large-epsilon sanity attack "
                   "(default 64; 0 turns it off).")
flags.DEFINE_integer("eval_batch_size", None, "Global evaluation batch size (default: 128 "
                     "rounded up to a multiple of the replica count).")
flags.DEFINE_integer("max_batches", None, "Evaluate only this many batches (default: the "
                     "whole split).")
flags.DEFINE_integer("seed", None, "Seed of the random starts and targets.")
flags.DEFINE_string("report", None, "Where the JSON report goes.")
flags.DEFINE_bool("strict", False, "Exit with status 1 when a sanity check fails.")
flags.DEFINE_string("strategy", None, f"Distribution: {', '.join(STRATEGIES)}.")
flags.DEFINE_string("tpu", None, "TPU name, grpc:// address or 'local'; implies "
                    "--strategy=tpu.")
flags.DEFINE_integer("num_gpus", None, "mirrored: use the first N GPUs (default: all).")
flags.DEFINE_integer("logical_cpus", None, "Split the CPU into N logical devices (testing "
                     "--strategy=mirrored on a CPU-only machine).")
flags.DEFINE_float("peer_timeout_seconds", None, "--strategy=multi_worker: how long each "
                   "worker waits at start-up for all workers of TF_CONFIG's cluster before "
                   "failing (default 900).")


def _numbers(flag: str, kind) -> tuple | None:
    """A list flag's values as numbers (None: not given)."""
    values = getattr(FLAGS, flag)
    if values is None:
        return None
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise UserError(f"Invalid --{flag} {','.join(values)!r}; give comma-separated "
                        f"{'integers' if kind is int else 'numbers'}.") from None


def request_from_flags() -> robustness.EvalRequest:
    """The flags as an evaluation request, checked (TF-free)."""
    source = loading.resolve(model_dir=FLAGS.model_dir, saved_model=FLAGS.saved_model,
                             checkpoint=FLAGS.checkpoint, use_ema=FLAGS.use_ema)
    data = robustness.DataOverrides(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, source=FLAGS.data_source,
        preprocessing=FLAGS.preprocessing, skip_corrupt=FLAGS.skip_corrupt)
    protocol = robustness.ProtocolOverrides(
        attack_steps=_numbers("attack_steps", int),
        attack_epsilons=_numbers("attack_epsilon", float),
        attack_step_size=FLAGS.attack_step_size, attack_restarts=FLAGS.attack_restarts,
        attack_modes=None if FLAGS.attack_mode is None else tuple(FLAGS.attack_mode),
        attacks=None if FLAGS.attacks is None else tuple(FLAGS.attacks),
        square_queries=FLAGS.square_queries, apgd_targets=FLAGS.apgd_targets,
        random_start=FLAGS.random_start, sanity_epsilon=FLAGS.sanity_epsilon,
        global_batch_size=FLAGS.eval_batch_size, max_batches=FLAGS.max_batches,
        seed=FLAGS.seed)
    runtime = RuntimeConfig(strategy=FLAGS.strategy or ("tpu" if FLAGS.tpu else "default"),
                            tpu=FLAGS.tpu, num_gpus=FLAGS.num_gpus,
                            logical_cpus=FLAGS.logical_cpus)
    if FLAGS.peer_timeout_seconds is not None:
        runtime.peer_timeout_seconds = FLAGS.peer_timeout_seconds
    request = robustness.EvalRequest(source, data, protocol, runtime, report=FLAGS.report)
    request.validate()
    return request


def main(argv):
    request = cli.start("eval.py", argv, request_from_flags)
    try:
        report = robustness.evaluate(request, log=lambda line: print(line, flush=True))
    except UserError as e:    # found only now: no readable checkpoint, data the model misfits
        cli.fail("eval.py", str(e))
    print(reports.format_table(report), flush=True)
    path = request.report_path(report["model"]["step"])
    reports.write_json(report, path)
    print(f"report: {path}", flush=True)
    if FLAGS.strict and report["sanity"] == reports.FAIL:
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main, "eval.py")
