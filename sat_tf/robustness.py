"""Robustness evaluation of a trained model, from where it is to the report (``run/eval.py``).

An :class:`EvalRequest` says what to evaluate and how: the model's location
(``loading.Source``), the data and evaluation-protocol values given explicitly
(:class:`DataOverrides`, :class:`ProtocolOverrides`; None keeps the run's value), the
distribution strategy and where the report goes. :func:`evaluate` loads the model, evaluates
it over the whole evaluation split (``sat_tf.evaluation``) and returns the report
(``sat_tf.reports``).

The defaults are the run's: its own evaluation attack (epsilon, step size, steps, random start:
what its evaluations during training used) joined with its evaluation protocol
(``Experiment.evaluation_attacks``), on its data (recorded split sizes and preprocessing). The
report's protocol names the values that were given (``given_by_flags``).

Building and checking a request needs no TensorFlow (command-line programs fail fast on bad
values); :func:`evaluate` imports it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

from sat_tf import loading, reports
from sat_tf.config import Experiment, RuntimeConfig
from sat_tf.errors import UserError

# Data facts a run records from its data folder: evaluating other data looks them up again.
DATA_FACTS = ("num_classes", "num_train_examples", "num_eval_examples", "label_base",
              "preprocessing")


@dataclasses.dataclass(frozen=True)
class DataOverrides:
    """Data to evaluate on instead of the run's; None keeps the run's value."""
    dataset: str | None = None
    data_dir: str | None = None
    source: str | None = None
    preprocessing: str | None = None
    skip_corrupt: bool | None = None

    def overrides(self) -> dict:
        """Dotted experiment overrides. Another dataset, folder or source drops the facts the
        run recorded about its own data (:data:`DATA_FACTS`), so they are looked up again."""
        given = {}
        if any(v is not None for v in (self.dataset, self.data_dir, self.source)):
            given.update({f"data.{fact}": None for fact in DATA_FACTS})
        given.update({f"data.{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)
                      if getattr(self, f.name) is not None})
        return given


@dataclasses.dataclass(frozen=True)
class ProtocolOverrides:
    """Evaluation-protocol values given explicitly; None keeps the run's value. The steps and
    epsilons given are the whole grid; the step size and random start are those of the run's
    evaluation attack (``Experiment.eval_attack``), which every attack of the protocol takes."""
    attack_steps: tuple[int, ...] | None = None
    attack_epsilons: tuple[float, ...] | None = None
    attack_step_size: float | None = None
    attack_restarts: int | None = None
    attack_modes: tuple[str, ...] | None = None
    attacks: tuple[str, ...] | None = None
    square_queries: int | None = None
    apgd_targets: int | None = None
    random_start: bool | None = None
    sanity_epsilon: float | None = None     # 0: no sanity attack
    global_batch_size: int | None = None
    max_batches: int | None = None
    seed: int | None = None

    def given(self) -> list[str]:
        """The names of the values given, sorted."""
        return sorted(f.name for f in dataclasses.fields(self)
                      if getattr(self, f.name) is not None)

    def overrides(self) -> dict:
        """Dotted experiment overrides (a sanity epsilon of 0 turns the sanity attack off)."""
        given = {name: getattr(self, name) for name in self.given()}
        out = {}
        if "attack_steps" in given:      # the grid is then exactly the steps given
            out["eval_attack.num_steps"] = min(given["attack_steps"])
        if "attack_epsilons" in given:
            out["eval_attack.epsilon"] = min(given["attack_epsilons"])
        if "attack_step_size" in given:
            out["eval_attack.step_size"] = given.pop("attack_step_size")
        if "random_start" in given:
            out["eval_attack.random_start"] = given.pop("random_start")
        if "sanity_epsilon" in given:
            given["sanity_epsilon"] = given["sanity_epsilon"] or None
        return {**out, **{f"evaluation.{name}": value for name, value in given.items()}}


def check_report_path(path: str) -> None:
    """A local report path must be a writable file path (checked before any evaluation work:
    an hour of attacks should not end in an unwritable report); remote ones are not checked."""
    if "://" in path:
        return
    if os.path.isdir(path):
        raise UserError(f"Invalid --report {path!r}: it is a folder; give a file path such "
                        "as report.json.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"Invalid --report {path!r}: its folder {folder!r} does not exist.")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"Invalid --report {path!r}: it is not writable.")


@dataclasses.dataclass(frozen=True)
class EvalRequest:
    """What to evaluate and how (``run/eval.py``'s flags as config objects)."""
    source: loading.Source
    data: DataOverrides = DataOverrides()
    protocol: ProtocolOverrides = ProtocolOverrides()
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    report: str | None = None     # where the report goes (None: :meth:`report_path`'s default)

    def experiment(self, stored: Experiment | None) -> Experiment:
        """The experiment to evaluate: the run's (``stored``) with its own evaluation attack,
        then the overrides; sat_tf's defaults with the overrides when no run is known."""
        overrides = {**self.data.overrides(), **self.protocol.overrides()}
        if stored is None:
            return Experiment().replace(**overrides)
        return stored.replace(**overrides)

    def validate(self) -> None:
        """One-line ValueErrors for bad values, without TensorFlow (a remote run's data is
        checked by :func:`evaluate`, once its experiment is read)."""
        exp = self.experiment(self.source.experiment)
        exp.evaluation.validate()
        if self.source.experiment is not None:
            exp.data.validate()
        self.runtime.validate()
        if self.report:
            check_report_path(self.report)

    def report_path(self, step: int | None) -> str:
        """Where the report goes: ``report``, else ``eval_report_step<step>.json`` in the
        run's folder, else (a SavedModel) ``eval_report.json`` in the current folder."""
        if self.report:
            return self.report
        if self.source.kind == "checkpoint":
            return os.path.join(self.source.path, f"eval_report_step{step}.json")
        return "eval_report.json"


def evaluate(request: EvalRequest, *, log: Callable[[str], None] = print) -> dict:
    """Loads the model and evaluates it under ``request.runtime``'s strategy; returns the report
    (``reports.build_report``). ``log`` gets one line on what runs; a progress bar goes to
    stderr.

    Raises a one-line ValueError when the data does not fit the model (more classes than it
    has) or a remote run's data settings are invalid.
    """
    from sat_tf import data, distribute, evaluation

    strategy = distribute.strategy_from_config(request.runtime)
    with strategy.scope():
        loaded = loading.load(request.source)
    exp = request.experiment(loaded.experiment)
    if loaded.experiment is not None:
        exp.data.validate()
    cfg = exp.evaluation
    cfg.global_batch_size = distribute.eval_batch_size(cfg.global_batch_size, strategy)
    split = data.info(exp.data)
    # APGD-T tries at most every wrong class (the names then say how many it tried).
    cfg.apgd_targets = min(cfg.apgd_targets, max(loaded.num_classes - 1, 1))
    needs_four = sorted({"apgd-t", "autoattack"} & set(cfg.attacks))
    if needs_four and loaded.num_classes < 4:
        raise UserError(f"Invalid attacks {','.join(needs_four)} for a model with "
                        f"{loaded.num_classes} classes: the targeted DLR loss needs at least 4; "
                        "use pgd, apgd-ce or square.")
    if split.num_classes is not None and split.num_classes > loaded.num_classes:
        raise UserError(f"The model has {loaded.num_classes} classes but dataset "
                        f"{exp.data.dataset!r} has {split.num_classes}; evaluate it on its own "
                        "data.")
    with data.remembered_listings():
        dataset = evaluation.distribute_eval_dataset(
            strategy, lambda **kw: data.build_dataset(exp.data, split="eval",
                                                      image_size=loaded.image_size, **kw),
            cfg.global_batch_size)
    attacks = exp.evaluation_attacks()
    own = exp.eval_attack
    steps, epsilons = exp.evaluation_grid()
    diagnostic = ([reports.large_epsilon_attack(cfg.sanity_epsilon, random_start=own.random_start)]
                  if cfg.sanity_epsilon else [])
    total = split.num_eval_examples
    if cfg.max_batches is not None and total is not None:
        total = min(total, cfg.max_batches * cfg.global_batch_size)
    log(f"Evaluating {loaded.name} ({loaded.activation}, {loaded.kind} {loaded.path}, step "
        f"{loaded.step}, {loaded.weights} weights) on {exp.data.dataset}: "
        f"{total if total is not None else 'all'} examples, {len(attacks)} attacks x "
        f"{cfg.attack_restarts} restarts, {strategy.num_replicas_in_sync} replica(s).")
    bar = reports.ProgressBar(total)
    result = evaluation.evaluate(loaded.model, dataset, attacks, strategy=strategy,
                                 restarts=cfg.attack_restarts, seed=cfg.seed,
                                 max_batches=cfg.max_batches, progress=bar,
                                 diagnostic_attacks=diagnostic)
    bar.close()
    protocol = {
        "defaults": ("the run's evaluation attack and protocol" if loaded.experiment is not None
                     else "sat_tf's evaluation protocol"),
        "given_by_flags": request.protocol.given(),
        "attack_steps": list(steps), "attack_epsilons": list(epsilons),
        "attack_step_size": own.step_size, "attack_restarts": cfg.attack_restarts,
        "attack_modes": list(cfg.attack_modes), "attacks": list(dict.fromkeys(cfg.attacks)),
        "square_queries": cfg.square_queries, "apgd_targets": cfg.apgd_targets,
        "random_start": own.random_start,
        "sanity_epsilon": cfg.sanity_epsilon, "seed": cfg.seed,
        "global_batch_size": cfg.global_batch_size, "max_batches": cfg.max_batches,
        "strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync,
    }
    data_info = {"dataset": exp.data.dataset, "data_dir": exp.data.data_dir, "split": "eval",
                 "examples_in_split": split.num_eval_examples,
                 "complete": result["examples"] == split.num_eval_examples}
    return reports.build_report(result, model=loaded.describe(), data=data_info,
                                protocol=protocol, paper=exp.paper or None)
