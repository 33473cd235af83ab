"""Robustness evaluation of a trained model (a training run or an exported SavedModel).

    python run/eval.py --model_dir=/tmp/sat --attack_steps=10,20,50,200
    python run/eval.py --model_dir=gs://.../r50-silu --data_dir=gs://.../imagenet --tpu=local
    python run/eval.py --saved_model=/tmp/sat-export --attack_epsilon=1,2,4,8,16 \
        --attack_mode=untargeted,targeted --attack_restarts=2

Runs clean top-1 / top-5 and PGD for every combination of --attack_steps x --attack_epsilon
x --attack_mode (each repeated --attack_restarts times) over the whole validation split; an
example counts as robust only if every attack failed on it. Adds a PGD-20 attack at
--sanity_epsilon (default 64) as a sanity check, kept out of the robust number. Prints a
table and writes a JSON report (--report; default: <model_dir>/eval_report_step<N>.json, or
eval_report.json in the current folder for --saved_model).

Defaults come from the run's experiment: its own evaluation attack (epsilon, step size, steps,
random start: what the run's evaluations used) added to its preset's evaluation protocol;
flags override, and the report's protocol says which values came from flags. The data is the
run's (its recorded split sizes and preprocessing); --data_dir etc. evaluate on other data.
A --model_dir evaluates the EMA weights when the run kept them (--noema: the raw weights).
A --saved_model is loaded with TensorFlow alone, without sat_tf's model code.

Bad flag values fail with a one-line message and exit status 2 before TensorFlow is imported.
Exit status 1 with --strict when a sanity check fails.
"""
from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import flags  # noqa: E402

from sat_tf import cli  # noqa: E402
from sat_tf import loading  # noqa: E402
from sat_tf.config import (ATTACK_MODES, DATA_SOURCES, DATASETS,  # noqa: E402
                           PREPROCESSINGS, STRATEGIES, Experiment, RuntimeConfig)

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

def _fail(message: str) -> None:
    cli.fail("eval.py", message)


def _numbers(name: str, values, kind):
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise ValueError(f"Invalid --{name} {','.join(values)!r}; give comma-separated "
                         f"{'integers' if kind is int else 'numbers'}.") from None


# Data facts a run records from its data folder: evaluating other data looks them up again.
_DATA_FACTS = ("data.num_classes", "data.num_train_examples", "data.num_eval_examples",
               "data.label_base")


def config_from_flags():
    """(source, experiment, flag overrides, runtime config); TF-free.

    For a remote location whose experiment is read only once TensorFlow is up, the
    experiment is the default one here and :func:`run` builds it again with
    :func:`evaluation_experiment`."""
    source = loading.resolve(model_dir=FLAGS.model_dir, saved_model=FLAGS.saved_model,
                             checkpoint=FLAGS.checkpoint, use_ema=FLAGS.use_ema)
    overrides = {}
    for flag, path in (("dataset", "data.dataset"), ("data_dir", "data.data_dir"),
                       ("data_source", "data.source"), ("preprocessing", "data.preprocessing"),
                       ("skip_corrupt", "data.skip_corrupt")):
        if getattr(FLAGS, flag) is not None:
            overrides[path] = getattr(FLAGS, flag)
    if any(FLAGS[f].present for f in ("dataset", "data_dir", "data_source")):
        overrides.update({path: None for path in _DATA_FACTS})
    if FLAGS.attack_steps is not None:
        overrides["evaluation.attack_steps"] = _numbers("attack_steps", FLAGS.attack_steps, int)
    if FLAGS.attack_epsilon is not None:
        overrides["evaluation.attack_epsilons"] = _numbers("attack_epsilon",
                                                           FLAGS.attack_epsilon, float)
    if FLAGS.attack_mode is not None:
        overrides["evaluation.attack_modes"] = tuple(FLAGS.attack_mode)
    for flag, field in (("attack_step_size", "attack_step_size"),
                        ("attack_restarts", "attack_restarts"),
                        ("random_start", "random_start"),
                        ("eval_batch_size", "global_batch_size"),
                        ("max_batches", "max_batches"), ("seed", "seed")):
        if getattr(FLAGS, flag) is not None:
            overrides[f"evaluation.{field}"] = getattr(FLAGS, flag)
    if FLAGS.sanity_epsilon is not None:
        overrides["evaluation.sanity_epsilon"] = FLAGS.sanity_epsilon or None
    overrides["evaluation.use_ema"] = FLAGS.use_ema
    exp = evaluation_experiment(source.experiment, overrides)
    exp.evaluation.validate()
    if source.experiment is not None:
        exp.data.validate()
    runtime = RuntimeConfig(strategy=FLAGS.strategy or ("tpu" if FLAGS.tpu else "default"),
                            tpu=FLAGS.tpu, num_gpus=FLAGS.num_gpus,
                            logical_cpus=FLAGS.logical_cpus)
    if FLAGS.peer_timeout_seconds is not None:
        runtime.peer_timeout_seconds = FLAGS.peer_timeout_seconds
    runtime.validate()
    if FLAGS.report:
        check_report_path(FLAGS.report)
    return source, exp, overrides, runtime


def own_attack(stored: Experiment) -> dict:
    """The run's own evaluation attack as evaluation overrides: its epsilon and step count
    join the evaluation protocol's, its step size and random start replace them (a run
    trained at epsilon 16 is attacked at 16 with its own step, not with PGD's 1 pixel)."""
    attack, protocol = stored.eval_attack, stored.evaluation
    return {
        "evaluation.attack_epsilons": tuple(sorted({*protocol.attack_epsilons, attack.epsilon})),
        "evaluation.attack_steps": tuple(sorted({*protocol.attack_steps, attack.num_steps})),
        "evaluation.attack_step_size": attack.step_size,
        "evaluation.random_start": attack.random_start,
    }


def evaluation_experiment(stored: Experiment | None, overrides: dict) -> Experiment:
    """The run's experiment with its own evaluation attack, then the flags' ``overrides``."""
    if stored is None:
        return Experiment().replace(**overrides)
    return stored.replace(**{**own_attack(stored), **overrides})


def check_report_path(path: str) -> None:
    """A local --report must be a writable file path (checked before any evaluation work:
    an hour of attacks should not end in an unwritable report)."""
    if "://" in path:
        return
    if os.path.isdir(path):
        raise ValueError(f"Invalid --report {path!r}: it is a folder; give a file path such "
                         "as report.json.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"Invalid --report {path!r}: its folder {folder!r} does not exist.")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"Invalid --report {path!r}: it is not writable.")


def _report_path(source, step) -> str:
    if FLAGS.report:
        return FLAGS.report
    if source.kind == "checkpoint":
        return os.path.join(source.path, f"eval_report_step{step}.json")
    return "eval_report.json"


def run(source, exp: Experiment, overrides: dict, runtime: RuntimeConfig) -> dict:
    """Loads the model and evaluates it; returns the report (TensorFlow from here on)."""
    from sat_tf import data, distribute, evaluation, reports

    strategy = distribute.strategy_from_config(runtime)
    with strategy.scope():
        model, info = loading.load(source)
    if source.experiment is not None:   # also when it was read only now (remote locations)
        exp = evaluation_experiment(source.experiment, overrides)
        exp.data.validate()
    cfg = exp.evaluation
    image_size = info["image_size"]
    cfg.global_batch_size = distribute.eval_batch_size(cfg.global_batch_size, strategy)
    split = data.info(exp.data)
    if split.num_classes is not None and split.num_classes > info["num_classes"]:
        raise ValueError(f"The model has {info['num_classes']} classes but dataset "
                         f"{exp.data.dataset!r} has {split.num_classes}; evaluate it on its own "
                         "data.")
    with data.remembered_listings():
        dataset = evaluation.distribute_eval_dataset(
            strategy, lambda **kw: data.build_dataset(exp.data, split="eval",
                                                      image_size=image_size, **kw),
            cfg.global_batch_size)
    attacks = reports.attacks_from_config(cfg)
    diagnostic = ([reports.large_epsilon_attack(cfg.sanity_epsilon, random_start=cfg.random_start)]
                  if cfg.sanity_epsilon else [])
    total = split.num_eval_examples
    if cfg.max_batches is not None and total is not None:
        total = min(total, cfg.max_batches * cfg.global_batch_size)
    print(f"Evaluating {info['name']} ({info['activation']}, {info['source']} "
          f"{info['path']}, step {info['step']}, {info['weights']} weights) on "
          f"{exp.data.dataset}: {total if total is not None else 'all'} examples, "
          f"{len(attacks)} attacks x "
          f"{cfg.attack_restarts} restarts, {strategy.num_replicas_in_sync} replica(s).",
          flush=True)
    bar = reports.ProgressBar(total)
    result = evaluation.evaluate(model, dataset, attacks, strategy=strategy,
                                 restarts=cfg.attack_restarts, seed=cfg.seed,
                                 max_batches=cfg.max_batches, progress=bar,
                                 diagnostic_attacks=diagnostic)
    bar.close()
    given = sorted(k.split(".", 1)[1] for k in overrides
                   if k.startswith("evaluation.") and k != "evaluation.use_ema")
    protocol = {
        "defaults": ("the run's evaluation attack and protocol" if source.experiment is not None
                     else "sat_tf's evaluation protocol"),
        "given_by_flags": given,
        "attack_steps": list(cfg.attack_steps), "attack_epsilons": list(cfg.attack_epsilons),
        "attack_step_size": cfg.attack_step_size, "attack_restarts": cfg.attack_restarts,
        "attack_modes": list(cfg.attack_modes), "random_start": cfg.random_start,
        "sanity_epsilon": cfg.sanity_epsilon, "seed": cfg.seed,
        "global_batch_size": cfg.global_batch_size, "max_batches": cfg.max_batches,
        "strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync,
    }
    data_info = {"dataset": exp.data.dataset, "data_dir": exp.data.data_dir, "split": "eval",
                 "examples_in_split": split.num_eval_examples,
                 "complete": result["examples"] == split.num_eval_examples}
    return reports.build_report(result, model=info, data=data_info, protocol=protocol,
                                paper=exp.paper or None)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    try:
        source, exp, overrides, runtime = config_from_flags()
    except ValueError as e:
        _fail(str(e))

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from sat_tf import reports
    try:
        report = run(source, exp, overrides, runtime)
    except ValueError as e:
        _fail(str(e))
    print(reports.format_table(report), flush=True)
    path = _report_path(source, report["model"].get("step"))
    reports.write_json(report, path)
    print(f"report: {path}", flush=True)
    if FLAGS.strict and report["sanity"] == reports.FAIL:
        sys.exit(1)



if __name__ == "__main__":
    cli.run(main, "eval.py")
