"""Which TensorFlow build is installed, and one-line errors when it is missing or the wrong one.

TensorFlow comes as several PyPI distributions that all install the same ``tensorflow``
package: ``tensorflow`` (CPU, and GPUs when CUDA is installed), ``tensorflow-tpu`` (Cloud TPU
VMs; releases up to 2.20), ``tensorflow-cpu``, ``tensorflow-intel``, ... pip treats them as
unrelated projects, so two of them overwrite each other's files and ``import tensorflow``
loads a mix, or the build installed last: on a TPU VM, one without TPU support ("TPUs not
found"). That is why setup.py requires no TensorFlow unconditionally and the extras ``cpu`` /
``gpu`` / ``tpu`` pick the build; this module tells the user which extra to use.

    install.installed_tensorflow()   # {"tensorflow-tpu": "2.20.0"}
    install.check_tensorflow()       # TensorFlowInstallError: none installed, or a clash
    install.check_tpu_build()        # TensorFlowInstallError unless the build is tensorflow-tpu

Each function reads the installed distributions with ``importlib.metadata``, or takes them as
``installed`` (``{name: version}``, every distribution or only TensorFlow's; for tests).
Importing this module imports no TensorFlow.
"""
from __future__ import annotations

import re
from importlib import metadata
from typing import Mapping

# The PyPI distributions that install the ``tensorflow`` package (normalised names).
TENSORFLOW_DISTRIBUTIONS = (
    "tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-tpu", "tensorflow-intel",
    "tensorflow-macos", "tensorflow-aarch64", "tensorflow-cpu-aws", "tensorflow-rocm",
    "intel-tensorflow", "tf-nightly", "tf-nightly-cpu", "tf-nightly-gpu", "tf-nightly-tpu",
)
# The ones built with TPU support.
TPU_DISTRIBUTIONS = ("tensorflow-tpu", "tf-nightly-tpu")

NO_TENSORFLOW = (
    "TensorFlow is not installed in this Python environment: install sat-tf with the build "
    "for this machine, pip install -e \".[cpu]\" (CPU, or GPU with CUDA installed), "
    "\".[gpu]\" (GPU, CUDA from pip) or \".[tpu]\" (Cloud TPU VM).")


class TensorFlowInstallError(ImportError):
    """TensorFlow is missing, installed twice over itself, or not the build asked for."""


def _normalise(name: str) -> str:
    """The PEP 503 form of a project name: ``TensorFlow_TPU`` -> ``tensorflow-tpu``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _all_installed() -> dict[str, str]:
    """``{normalised name: version}`` of every installed distribution (first on sys.path)."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(_normalise(name), dist.version)
    return found


def installed_tensorflow(installed: Mapping[str, str] | None = None) -> dict[str, str]:
    """The installed TensorFlow distributions, ``{normalised name: version}``."""
    installed = _all_installed() if installed is None else installed
    return {_normalise(n): v for n, v in installed.items()
            if _normalise(n) in TENSORFLOW_DISTRIBUTIONS}


def _describe(found: Mapping[str, str]) -> str:
    """``tensorflow 2.21.0 and tensorflow-cpu 2.20.0``, for messages."""
    return " and ".join(f"{n} {v}" for n, v in sorted(found.items())) or "no TensorFlow"


def _clash(found: Mapping[str, str]) -> TensorFlowInstallError | None:
    """The error for tensorflow-tpu installed together with another build, else None.

    Uninstalling the other build deletes the files they share, hence the forced reinstall.
    """
    tpu = {n: v for n, v in found.items() if n in TPU_DISTRIBUTIONS}
    others = sorted(set(found) - set(tpu))
    if not tpu or not others:
        return None
    name, version = sorted(tpu.items())[0]
    return TensorFlowInstallError(
        f"{_describe(found)} are installed and overwrite each other's files: "
        f"pip uninstall -y {' '.join(others)}, then "
        f"pip install --force-reinstall --no-deps {name}=={version}.")


def check_tensorflow(installed: Mapping[str, str] | None = None) -> dict[str, str]:
    """The installed TensorFlow distributions; a one-line TensorFlowInstallError naming the
    fix when there is none, or when tensorflow-tpu shares its files with another build."""
    found = installed_tensorflow(installed)
    if not found:
        raise TensorFlowInstallError(NO_TENSORFLOW)
    clash = _clash(found)
    if clash is not None:
        raise clash
    return found


def check_tpu_build(installed: Mapping[str, str] | None = None) -> str:
    """The name of the installed TPU build; a one-line TensorFlowInstallError otherwise.

    Called before a TPU strategy is built: with any other build TensorFlow only fails later,
    with "TPUs not found".
    """
    found = installed_tensorflow(installed)
    clash = _clash(found)
    if clash is not None:
        raise clash
    if len(found) == 1 and next(iter(found)) in TPU_DISTRIBUTIONS:
        return next(iter(found))
    fix = f"pip uninstall -y {' '.join(sorted(found))}, then " if found else ""
    raise TensorFlowInstallError(
        f"--tpu needs the tensorflow-tpu build of TensorFlow, but {_describe(found)} is "
        f"installed: on the TPU VM, {fix}pip install -e \".[tpu]\".")


def missing_tensorflow_message(installed: Mapping[str, str] | None = None) -> str:
    """The one-line message for ``import tensorflow`` failing with ModuleNotFoundError.

    The clash of :func:`check_tensorflow` if there is one; else :data:`NO_TENSORFLOW`, also
    when a TensorFlow distribution is installed (then this Python is not the one it is in).
    """
    try:
        check_tensorflow(installed)
    except TensorFlowInstallError as e:
        return str(e)
    return NO_TENSORFLOW
