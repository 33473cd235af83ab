"""Evaluation reports: the attack grid, sanity checks, JSON and a printed table.

TensorFlow-free: ``sat_tf.evaluation.evaluate`` produces the counts, this module turns them
into a report a reader can trust or distrust. The sanity checks follow Carlini et al., "On
Evaluating Adversarial Robustness" (2019):

* ``robust_le_clean``: no untargeted attack leaves more adversarial images correctly
  classified than clean ones (an attack that helps the model is broken; a targeted one may
  legitimately push a misclassified image onto its true class);
* ``monotone_in_steps``: more PGD steps never raise accuracy (if they do, the attack has not
  converged or gradients are unreliable) -- a warning;
* ``monotone_in_epsilon``: a larger epsilon never raises accuracy -- a failure;
* ``large_epsilon``: an attack with a very large epsilon (64 by default) drives accuracy near
  0 (otherwise gradients do not lead anywhere: masking or a bug);
* ``gradient_masking``: a warning when the input gradient is all-zero or non-finite on many
  examples;
* ``targeted_weaker``: a targeted attack (random target) fools no more examples than the
  untargeted one with the same budget -- a warning.

Differences within ``tolerance`` (a fraction of the examples; at least two examples) are
random-start noise and pass.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
from collections import defaultdict
from typing import Sequence

from sat_tf.config import AttackConfig
from sat_tf.errors import UserError

FORMAT = "sat_tf.evaluation.report/1"
PASS, WARN, FAIL, SKIPPED = "pass", "warn", "fail", "skipped"
LARGE_EPSILON = 64.0
LARGE_EPSILON_STEPS = 20
LARGE_EPSILON_MAX_ACCURACY = 0.05
GRADIENT_MASKING_FRACTION = 0.05


# ---------------------------------------------------------------------------------------------
# The sanity check's attack.

def large_epsilon_attack(epsilon: float = LARGE_EPSILON, num_steps: int = LARGE_EPSILON_STEPS,
                         random_start: bool = True) -> AttackConfig:
    """The ``large_epsilon`` check's attack: step 2.5 epsilon / steps, so PGD can cross the
    whole ball (Madry et al.'s rule)."""
    if not epsilon > 0:
        raise UserError(f"Invalid sanity-check epsilon {epsilon!r}; it must be > 0.")
    return AttackConfig(epsilon=float(epsilon), step_size=2.5 * float(epsilon) / num_steps,
                        num_steps=num_steps, random_start=random_start, clean_start_prob=0.0)


def _num(v) -> str:
    return f"{v:g}"


def attack_name(cfg: dict | AttackConfig) -> str:
    """E.g. "PGD-10 eps 4 step 1 untargeted" (targeted: "... targeted"), "APGD-CE-100 eps 4",
    "APGD-T-100 eps 4 9 targets", "Square-5000 eps 4", "AutoAttack eps 4 (APGD-100, 9
    targets, Square-5000)"."""
    if isinstance(cfg, AttackConfig):
        cfg = dataclasses.asdict(cfg)
    method, eps = cfg.get("method", "pgd"), _num(cfg["epsilon"])
    if method == "pgd":
        name = (f"PGD-{cfg['num_steps']} eps {eps} step {_num(cfg['step_size'])} "
                f"{cfg['mode']}")
    elif method == "apgd-ce":
        name = f"APGD-CE-{cfg['num_steps']} eps {eps}"
    elif method == "apgd-t":
        name = f"APGD-T-{cfg['num_steps']} eps {eps} {cfg['num_targets']} targets"
    elif method == "square":
        return f"Square-{cfg['queries']} eps {eps}"
    else:
        name = (f"AutoAttack eps {eps} (APGD-{cfg['num_steps']}, {cfg['num_targets']} targets, "
                f"Square-{cfg['queries']})")
    if not cfg.get("random_start", True):
        name += " no-random-start"
    if cfg.get("backward"):
        name += f" backward={cfg['backward']}"
    return name


def strongest(attacks: list[dict]) -> str:
    """The attacks of a report's rows in short, each method at its largest budget:
    "PGD-20", "PGD-200+AutoAttack-100", "Square-5000" ("PGD-0" when none ran)."""
    short = {"pgd": "PGD", "apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "square": "Square",
             "autoattack": "AutoAttack"}
    budgets = {}
    for a in attacks:
        c = a["config"]
        method = c.get("method", "pgd")
        budget = c["queries"] if method == "square" else c["num_steps"]
        budgets[method] = max(budgets.get(method, 0), budget)
    return "+".join(f"{short[m]}-{b}" for m, b in budgets.items()) or "PGD-0"


# ---------------------------------------------------------------------------------------------
# Sanity checks.

def _check(name: str, status: str, detail: str) -> dict:
    return {"name": name, "status": status, "detail": detail}


def _pct(x: float) -> str:
    return f"{100.0 * x:.2f}%"


def _monotone(attacks: list[dict], key: str, tol: float, name: str, bad_status: str) -> dict:
    """Accuracy must not rise along ``key`` within groups equal in every other setting."""
    groups = defaultdict(list)
    for a in attacks:
        c = a["config"]
        other = tuple(sorted((k, v) for k, v in c.items() if k != key)) + (a["restarts"],)
        groups[other].append(a)
    rising, compared = [], 0
    for members in groups.values():
        members = sorted(members, key=lambda a: a["config"][key])
        for lo, hi in zip(members, members[1:]):
            compared += 1
            if hi["accuracy"] > lo["accuracy"] + tol:
                rising.append(f"{attack_name(hi['config'])} {_pct(hi['accuracy'])} > "
                              f"{attack_name(lo['config'])} {_pct(lo['accuracy'])}")
    what = "steps" if key == "num_steps" else "epsilon"
    if not compared:
        return _check(name, SKIPPED, f"only one {what} value per attack setting")
    if rising:
        helps = "more steps help the model" if key == "num_steps" else "a larger epsilon helps"
        return _check(name, bad_status, f"{helps}: " + "; ".join(rising))
    return _check(name, PASS, f"accuracy non-increasing in {what} ({compared} comparisons)")


def sanity_checks(result: dict, *, tolerance: float = 0.005) -> list[dict]:
    """The checks listed in the module doc, on a result of ``evaluation.evaluate``."""
    n = max(result["examples"], 1)
    tol = max(tolerance, 2.0 / n)
    attacks = result["attacks"]
    clean = result["clean_top1"]
    checks = []

    # Untargeted only: a targeted attack may push a misclassified image onto its true class.
    over = [a for a in attacks + result.get("diagnostic_attacks", [])
            if a["config"]["mode"] == "untargeted"
            and a.get("adversarial_accuracy", 0.0) > clean + tol]
    if result["robust"] > clean + 1e-12:
        checks.append(_check("robust_le_clean", FAIL,
                             f"robust {_pct(result['robust'])} > clean {_pct(clean)}"))
    elif over:
        raised = "; ".join(f"{attack_name(a['config'])} {_pct(a['adversarial_accuracy'])}"
                           for a in over)
        checks.append(_check("robust_le_clean", FAIL, f"attacks raise accuracy above clean: "
                             f"{raised}"))
    else:
        checks.append(_check("robust_le_clean", PASS,
                             f"robust {_pct(result['robust'])} <= clean {_pct(clean)}"))

    checks.append(_monotone(attacks, "num_steps", tol, "monotone_in_steps", WARN))
    checks.append(_monotone(attacks, "epsilon", tol, "monotone_in_epsilon", FAIL))

    large = [a for a in result.get("diagnostic_attacks", [])
             if a["config"]["epsilon"] >= LARGE_EPSILON and a["config"]["mode"] == "untargeted"]
    if not large:
        checks.append(_check("large_epsilon", SKIPPED, "no attack with epsilon >= 64 was run"))
    else:
        a = max(large, key=lambda a: a["config"]["epsilon"])
        acc = a["adversarial_accuracy"]
        status = PASS if acc <= LARGE_EPSILON_MAX_ACCURACY else FAIL
        checks.append(_check("large_epsilon", status,
                             f"{attack_name(a['config'])}: accuracy {_pct(acc)} (must be <= "
                             f"{_pct(LARGE_EPSILON_MAX_ACCURACY)})"))

    zero = result.get("zero_gradient_fraction", 0.0)
    nonfinite = result.get("nonfinite_gradient_fraction", 0.0)
    status = WARN if zero + nonfinite > GRADIENT_MASKING_FRACTION else PASS
    checks.append(_check("gradient_masking", status,
                         f"input gradient all-zero on {_pct(zero)}, non-finite on "
                         f"{_pct(nonfinite)} of examples (warn above "
                         f"{_pct(GRADIENT_MASKING_FRACTION)})"))

    by_budget = defaultdict(dict)
    for a in attacks:
        c = a["config"]
        if c.get("method", "pgd") != "pgd":
            continue
        by_budget[(c["epsilon"], c["step_size"], c["num_steps"])][c["mode"]] = a
    pairs = [m for m in by_budget.values() if len(m) == 2]
    if not pairs:
        checks.append(_check("targeted_weaker", SKIPPED, "no targeted/untargeted pair was run"))
    else:
        stronger = [m["targeted"] for m in pairs
                    if m["targeted"]["accuracy"] + tol < m["untargeted"]["accuracy"]]
        checks.append(_check(
            "targeted_weaker", WARN if stronger else PASS,
            ("targeted beats untargeted: " + "; ".join(attack_name(a["config"]) for a in stronger))
            if stronger else f"targeted accuracy >= untargeted ({len(pairs)} pairs)"))
    return checks


def overall_status(checks: Sequence[dict]) -> str:
    statuses = {c["status"] for c in checks}
    return FAIL if FAIL in statuses else WARN if WARN in statuses else PASS


# ---------------------------------------------------------------------------------------------
# The report.

def build_report(result: dict, *, model: dict, data: dict, protocol: dict,
                 paper: dict | None = None, tolerance: float = 0.005) -> dict:
    """A JSON-ready report: where the numbers come from, the numbers, and the checks."""
    checks = sanity_checks(result, tolerance=tolerance)
    named = lambda attacks: [{"name": attack_name(a["config"]), **a} for a in attacks]
    report = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": dict(model),
        "data": dict(data),
        "protocol": dict(protocol),
        **{k: v for k, v in result.items() if k not in ("attacks", "diagnostic_attacks")},
        "attacks": named(result["attacks"]),
        "diagnostic_attacks": named(result.get("diagnostic_attacks", [])),
        "examples_per_second": result["examples"] / max(result["seconds"], 1e-9),
        "sanity": overall_status(checks),
        "sanity_checks": checks,
    }
    if paper:
        report["paper"] = dict(paper)
    return report


def _open(path: str, mode: str):
    """Local files with open(); remote (gs://...) ones with TensorFlow's gfile."""
    if "://" in path:
        import tensorflow as tf
        return tf.io.gfile.GFile(path, mode)
    if "w" in mode:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, mode)


def write_json(report: dict, path: str) -> None:
    with _open(path, "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")


def read_json(path: str) -> dict:
    with _open(path, "r") as f:
        report = json.load(f)
    if report.get("format") != FORMAT:
        raise UserError(f"{path} is not a sat_tf evaluation report (format "
                        f"{report.get('format')!r}, expected {FORMAT!r}).")
    return report


def format_table(report: dict) -> str:
    """The report as a plain-text table."""
    n = report["examples"]
    m = report["model"]
    rows = [("clean top-1", report["clean_top1"], report["clean_correct"]),
            ("clean top-5", report["clean_top5"], None)]
    for a in report["attacks"]:
        rows.append((f"{a['name']} x{a['restarts']}", a["accuracy"], a["correct"], _passes(a)))
        rows += [(f"  after {s['stage']}", s["accuracy"], s["correct"], None)
                 for s in a.get("stages", [])]
    if report["attacks"]:
        rows.append((f"robust (worst of {len(report['attacks'])})", report["robust"],
                     report["robust_correct"]))
    rows += [(f"[check] {a['name']} x{a['restarts']}", a["accuracy"], a["correct"], _passes(a))
             for a in report.get("diagnostic_attacks", [])]
    width = max(len(r[0]) for r in rows) + 2
    desc = f"{m.get('name', '?')} ({m.get('activation', '?')})"
    if m.get("step") is not None:
        desc += f", step {m['step']}"
    if m.get("weights"):
        desc += f", {m['weights']} weights"
    cwidth = len(f"{n}/{n}")
    passes = "  passes/example fwd+bwd" if any(r[3:] and r[3] for r in rows) else ""
    lines = [f"model: {desc}; {report['data'].get('dataset', '?')} eval split, {n} examples",
             f"{'':<{width}}{'accuracy':>9}  {'correct':<{cwidth}}{passes}".rstrip()]
    for name, acc, correct, *passes in rows:
        tail = f"  {f'{correct}/{n}':<{cwidth}}" if correct is not None else ""
        if passes and passes[0]:
            tail += f"  {passes[0]}"
        lines.append(f"{name:<{width}}{100.0 * acc:>8.2f}%{tail}".rstrip())
    paper = report.get("paper") or {}
    if paper.get("clean") is not None or paper.get("robust") is not None:
        fmt = lambda v: "-" if v is None else f"{v:.1f}%"
        lines.append(f"paper ({paper.get('source')}): clean {fmt(paper.get('clean'))}, robust "
                     f"{fmt(paper.get('robust'))} ({paper.get('robust_attack') or '-'})")
    lines.append(f"sanity: {report['sanity']}")
    for c in report["sanity_checks"]:
        lines.append(f"  {c['status']:<7} {c['name']}: {c['detail']}")
    lines.append(f"time: {report['seconds']:.1f} s "
                 f"({report['examples_per_second']:.1f} examples/s)")
    return "\n".join(lines)


def _passes(attack: dict) -> str | None:
    """"fwd+bwd" passes per example of a report's attack row (None in older reports)."""
    if "forward_passes_per_example" not in attack:
        return None
    return (f"{attack['forward_passes_per_example']:.1f}+"
            f"{attack['backward_passes_per_example']:.1f}")


# ---------------------------------------------------------------------------------------------
# Progress.

class ProgressBar:
    """A one-line progress bar with ETA: ``ProgressBar(total)(batches, examples)``."""

    def __init__(self, total: int | None, stream=None, width: int = 30, min_interval: float = 0.5):
        self.total, self.stream, self.width = total, stream or sys.stderr, width
        self.min_interval = min_interval
        self.start = time.time()
        self._last = 0.0
        self._examples = 0
        self._closed = False
        self._width = 0

    def line(self, examples: int, now: float | None = None) -> str:
        elapsed = (now or time.time()) - self.start
        rate = examples / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(examples / self.total, 1.0)
            bar = "#" * int(frac * self.width)
            eta = (self.total - examples) / rate if rate > 0 else float("nan")
            return (f"[{bar:<{self.width}}] {examples}/{self.total} {100 * frac:5.1f}% "
                    f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}, {rate:.1f} ex/s")
        return f"{examples} examples {_clock(elapsed)} elapsed, {rate:.1f} ex/s"

    def __call__(self, batches: int, examples: int) -> None:
        now = time.time()
        done = self.total is not None and examples >= self.total
        if now - self._last < self.min_interval and not done:
            return
        self._last = now
        self._examples = examples
        self._write(self.line(examples, now))
        if done:
            self.stream.write("\n")
            self._closed = True
        self.stream.flush()

    def _write(self, line: str) -> None:
        width = len(line.rstrip("\n"))
        self.stream.write("\r" + line.rstrip("\n").ljust(self._width) + line[width:])
        self._width = width

    def close(self) -> None:
        """Ends the line (prints the final state if the total was never reached)."""
        if not self._closed:
            self._write(self.line(self._examples) + "\n")
            self.stream.flush()
            self._closed = True


def _clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "--:--"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60:02d}:{s % 60:02d}"
