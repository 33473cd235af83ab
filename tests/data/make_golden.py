"""Writes the golden runs that pin the redesign of issue 11 (run once, at commit 9d894a8).

    python tests/data/make_golden.py          # prints the pins; writes tests/data/legacy_run

Two short deterministic runs through the public entry points (``Trainer`` with a model the
registry builds): their final loss, a checksum of the weights, optimizer slots and EMA, and
the logits of a fixed batch. ``tests/test_golden.py`` holds the printed numbers and checks
that the code still produces them; ``legacy_run/`` is the first run's directory as that code
wrote it (experiment.json, the last checkpoint, final_eval.json), which later versions must
still load and resume.
"""
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import conftest  # noqa: E402,F401  (two logical CPUs, as in the suite)
import test_golden  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    pins = {}
    for name in test_golden.RUNS:
        model_dir = tempfile.mkdtemp(prefix=f"golden-{name}-")
        pins[name] = test_golden.run_and_measure(name, model_dir)
        if name == test_golden.LEGACY:
            target = os.path.join(HERE, "legacy_run")
            shutil.rmtree(target, ignore_errors=True)
            os.makedirs(target)
            for f in os.listdir(model_dir):
                if f.startswith(("ckpt-", "checkpoint", "experiment.json", "final_eval.json")):
                    shutil.copy(os.path.join(model_dir, f), target)
        shutil.rmtree(model_dir)
    print(json.dumps(pins, indent=1))


if __name__ == "__main__":
    main()
