"""Lists the named experiment presets, or prints one fully resolved.

    python run/experiments.py list                 # name, paper numbers, description
    python run/experiments.py list --filter=cifar10
    python run/experiments.py show imagenet-resnet50-silu    # the whole config as JSON

Every preset runs as ``python run/train.py --experiment=NAME`` (ImageNet ones also need
``--data_dir``). No TensorFlow is imported.
"""
from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import app, flags  # noqa: E402

from sat_tf import experiments  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("filter", None, "list: only presets whose name contains this text.")

USAGE = "usage: experiments.py list [--filter=TEXT] | show NAME"


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


def main(argv):
    args = argv[1:]
    try:
        if args == ["list"]:
            print("\n".join(list_lines(FLAGS.filter)))
        elif len(args) == 2 and args[0] == "show":
            print(json.dumps(experiments.get(args[1]).to_dict(), indent=2))
        else:
            raise ValueError(f"Invalid arguments {' '.join(args)!r}; {USAGE}.")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
