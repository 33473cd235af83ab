"""Lists the named experiment presets, or prints one fully resolved.

    python run/experiments.py list                 # name, paper numbers, description
    python run/experiments.py list --filter=cifar10
    python run/experiments.py show imagenet-resnet50-silu    # the whole config as JSON
    python run/experiments.py results runs/*/eval_report_step*.json   # ours beside the paper

Every preset runs as ``python run/train.py --experiment=NAME`` (ImageNet ones also need
``--data_dir``). No TensorFlow is imported.
"""
from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import app, flags  # noqa: E402

from sat_tf import cli, experiments  # noqa: E402
from sat_tf.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("filter", None, "list: only presets whose name contains this text.")

USAGE = "usage: experiments.py list [--filter=TEXT] | show NAME | results REPORT.json..."


def _number(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def list_lines(name_filter: str | None = None) -> list[str]:
    """One line per preset: name, the paper's clean / robust accuracy, description."""
    names = [n for n in experiments.names() if not name_filter or name_filter in n]
    width = max([len(n) for n in names] + [4])
    lines = [f"{'name':<{width}}  paper clean / robust  description"]
    for n in names:
        exp = experiments.get(n)
        paper = exp.paper or {}
        nums = f"{_number(paper.get('clean')):>5} / {_number(paper.get('robust')):<5}"
        lines.append(f"{n:<{width}}  {nums:<20}  {exp.description}")
    return lines


def results_lines(paths: list[str]) -> list[str]:
    """Ours beside the paper's numbers, one line per run/eval.py report (percent)."""
    from sat_tf import reports
    rows = []
    for path in paths:
        r = reports.read_json(path)
        paper = r.get("paper") or {}
        rows.append((r["model"].get("experiment_name") or r["model"].get("name") or path,
                     100 * r["clean_top1"], 100 * r["robust"],
                     f"worst to {reports.strongest(r['attacks'])}",
                     paper.get("clean"), paper.get("robust"), r["sanity"]))
    width = max([len(row[0]) for row in rows] + [10])
    awidth = max([len(row[3]) for row in rows] + [15])
    lines = [f"{'experiment':<{width}}  {'clean':>5}  {'robust':>6}  {'attack':<{awidth}}  "
             f"{'paper clean':>11}  {'paper robust':>12}  sanity"]
    for name, clean, robust, attack, p_clean, p_robust, sanity in rows:
        lines.append(f"{name:<{width}}  {clean:5.1f}  {robust:6.1f}  {attack:<{awidth}}  "
                     f"{_number(p_clean):>11}  {_number(p_robust):>12}  {sanity}")
    return lines


def main(argv):
    args = argv[1:]
    try:
        if args == ["list"]:
            print("\n".join(list_lines(FLAGS.filter)))
        elif len(args) == 2 and args[0] == "show":
            print(json.dumps(experiments.get(args[1]).to_dict(), indent=2))
        elif len(args) >= 2 and args[0] == "results":
            print("\n".join(results_lines(args[1:])))
        else:
            raise UserError(f"Invalid arguments {' '.join(args)!r}; {USAGE}.")
    except (ValueError, OSError) as e:
        cli.fail("experiments.py", str(e))
    return 0


if __name__ == "__main__":
    app.run(main)
