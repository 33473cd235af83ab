"""Installing the right TensorFlow build: setup.py's extras pick it (a TPU VM keeps
tensorflow-tpu, which pip would otherwise overwrite with the CPU build), checked on the
metadata built from setup.py and by an offline pip dry run over dummy wheels;
``sat_tf.install`` names the fix in one line; run/train.py turns a missing TensorFlow into
that line. Nothing here uses the network."""
import base64
import email.parser
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement

from sat_tf import cli, install

ROOT = pathlib.Path(__file__).resolve().parent.parent
TF = set(install.TENSORFLOW_DISTRIBUTIONS)

# A version of every requirement of every extra resolved below, within setup.py's specifiers;
# both TensorFlow builds are offered, so that pip can pick the wrong one.
DUMMY_WHEELS = {
    "tensorflow": "2.21.0", "tensorflow-tpu": "2.20.0", "keras": "3.10.0",
    "tensorflow-datasets": "4.9.9", "importlib-resources": "6.5.2", "absl-py": "2.3.1",
    "numpy": "2.0.2", "pillow": "11.3.0", "pytest": "8.3.0", "scikit-learn": "1.5.2",
    "matplotlib": "3.9.2", "setuptools": "75.0.0", "adversarial-robustness-toolbox": "1.20.1",
}


def _norm(name):
    return name.lower().replace("_", "-").replace(".", "-")


def _copy_package(dest):
    """setup.py and the package in ``dest``: building there leaves the shared tree alone."""
    dest.mkdir(parents=True)
    shutil.copy(ROOT / "setup.py", dest)
    shutil.copytree(ROOT / "sat_tf", dest / "sat_tf",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


# --- the metadata built from setup.py --------------------------------------------------------

@pytest.fixture(scope="module")
def requirements(tmp_path_factory):
    """The Requires-Dist of this package, built by the PEP 517 hook pip itself calls (the
    editable install's metadata is stale until it is reinstalled)."""
    tmp = tmp_path_factory.mktemp("metadata")
    src, out = _copy_package(tmp / "src"), tmp / "out"
    out.mkdir()
    hook = ("import sys; from setuptools import build_meta; "
            "build_meta.__legacy__.prepare_metadata_for_build_wheel(sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", hook, str(out)], cwd=src, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (dist_info,) = out.glob("*.dist-info")
    meta = email.parser.Parser().parsestr((dist_info / "METADATA").read_text())
    assert {"cpu", "gpu", "tpu", "test", "plot", "bench"} <= set(meta.get_all("Provides-Extra"))
    return [Requirement(r) for r in meta.get_all("Requires-Dist")]


def _for(requirements, extra=None):
    """``{name: Requirement}`` of the unconditional requirements, or of ``extra``'s only."""
    if extra is None:
        return {_norm(r.name): r for r in requirements if r.marker is None}
    return {_norm(r.name): r for r in requirements
            if r.marker is not None and r.marker.evaluate({"extra": extra})}


def test_no_unconditional_requirement_is_a_tensorflow_build(requirements):
    assert set(_for(requirements)) == {"keras", "tensorflow-datasets", "importlib-resources",
                                       "absl-py", "numpy", "pillow", "scikit-learn"}
    assert not TF & set(_for(requirements))


def test_each_build_extra_requires_exactly_its_tensorflow(requirements):
    tpu = _for(requirements, "tpu")
    assert TF & set(tpu) == {"tensorflow-tpu"}
    assert tpu["tensorflow-tpu"].specifier.contains("2.20.0")   # the newest tensorflow-tpu
    assert not tpu["tensorflow-tpu"].specifier.contains("2.17.0")

    cpu = _for(requirements, "cpu")
    assert TF & set(cpu) == {"tensorflow"} and not cpu["tensorflow"].extras
    assert all(cpu["tensorflow"].specifier.contains(v) for v in ("2.18.0", "2.21.1"))
    assert not any(cpu["tensorflow"].specifier.contains(v) for v in ("2.17.1", "2.22.0"))

    gpu = _for(requirements, "gpu")
    assert TF & set(gpu) == {"tensorflow"} and gpu["tensorflow"].extras == {"and-cuda"}
    assert gpu["tensorflow"].specifier == cpu["tensorflow"].specifier


@pytest.mark.parametrize("extra", ["test", "plot", "bench"])
def test_other_extras_require_no_tensorflow(requirements, extra):
    assert _for(requirements, extra) and not TF & set(_for(requirements, extra))


# --- an offline pip dry run -----------------------------------------------------------------

def _dummy_wheel(folder, name, version):
    """An empty wheel of ``name`` ``version`` without dependencies."""
    stem = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{stem}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{stem}.dist-info/WHEEL": ("Wheel-Version: 1.0\nGenerator: sat-tf tests\n"
                                    "Root-Is-Purelib: true\nTag: py3-none-any\n"),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[f"{stem}.dist-info/RECORD"] = "\n".join(record + [f"{stem}.dist-info/RECORD,,"]) + "\n"
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)


@pytest.fixture(scope="module")
def pip_dry_run(tmp_path_factory):
    """``run(extras)``: the names pip would install for ``<copy of the repo>[extras]``, from
    dummy wheels only: no index, no pip configuration, an unreachable proxy."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True,
                      timeout=60).returncode:
        pytest.skip(f"pip is not installed in {sys.executable}")
    tmp = tmp_path_factory.mktemp("pip")
    wheels = tmp / "wheels"
    wheels.mkdir()
    for name, version in DUMMY_WHEELS.items():
        _dummy_wheel(wheels, name, version)
    src = _copy_package(tmp / "sat-tf")
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith("PIP_") and not k.lower().endswith("_proxy")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")

    def run(extras):
        report = tmp / f"report-{extras}.json"
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index",
             "--find-links", str(wheels), "--no-build-isolation", "--ignore-installed",
             "--no-cache-dir", "--report", str(report), f"{src}[{extras}]"],
            capture_output=True, text=True, env=env, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return {_norm(p["metadata"]["name"]): p["metadata"]["version"]
                for p in json.loads(report.read_text())["install"]}

    return run


@pytest.mark.parametrize("extras, build, version", [
    ("tpu", "tensorflow-tpu", "2.20.0"),
    ("tpu,test", "tensorflow-tpu", "2.20.0"),
    ("cpu", "tensorflow", "2.21.0"),
    ("cpu,test", "tensorflow", "2.21.0"),
    ("gpu", "tensorflow", "2.21.0"),
])
def test_pip_resolves_exactly_the_build_the_extra_names(pip_dry_run, extras, build, version):
    resolved = pip_dry_run(extras)
    assert resolved["sat-tf"] == "0.1.0"
    assert {"keras", "tensorflow-datasets", "numpy", "pillow"} <= set(resolved)
    assert {n: v for n, v in resolved.items() if n in TF} == {build: version}


# --- sat_tf.install -------------------------------------------------------------------------

def _error(check, installed):
    with pytest.raises(install.TensorFlowInstallError) as e:
        check(installed)
    message = str(e.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("installed", [{}, {"numpy": "2.0.2", "keras": "3.10.0"}])
def test_no_tensorflow_names_the_three_extras(installed):
    message = _error(install.check_tensorflow, installed)
    for words in ("not installed", 'pip install -e ".[cpu]"', '".[gpu]"', '".[tpu]"'):
        assert words in message
    message = _error(install.check_tpu_build, installed)
    assert "--tpu needs the tensorflow-tpu build" in message and "no TensorFlow" in message
    assert 'pip install -e ".[tpu]"' in message and "uninstall" not in message


def test_cpu_build_is_fine_except_for_a_tpu():
    installed = {"tensorflow": "2.21.0", "numpy": "2.0.2", "tensorflow-datasets": "4.9.9"}
    assert install.installed_tensorflow(installed) == {"tensorflow": "2.21.0"}
    assert install.check_tensorflow(installed) == {"tensorflow": "2.21.0"}
    message = _error(install.check_tpu_build, installed)
    for words in ("--tpu needs the tensorflow-tpu build", "but tensorflow 2.21.0 is installed",
                  "pip uninstall -y tensorflow,", 'pip install -e ".[tpu]"'):
        assert words in message
    # Windows: tensorflow depends on tensorflow-intel; not a clash.
    assert install.check_tensorflow({"tensorflow": "2.15.0", "tensorflow-intel": "2.15.0"})


@pytest.mark.parametrize("name, build", [("tensorflow-tpu", "tensorflow-tpu"),
                                         ("TensorFlow_TPU", "tensorflow-tpu"),
                                         ("tf-nightly-tpu", "tf-nightly-tpu")])
def test_tpu_build_passes_both_checks(name, build):
    installed = {name: "2.20.0", "libtpu": "0.0.17", "keras": "3.10.0"}
    assert install.check_tensorflow(installed) == {build: "2.20.0"}
    assert install.check_tpu_build(installed) == build


@pytest.mark.parametrize("other", ["tensorflow", "tensorflow-cpu"])
def test_tpu_build_with_another_build_is_a_clash_with_its_fix(other):
    installed = {"tensorflow-tpu": "2.20.0", other: "2.21.0"}
    for check in (install.check_tensorflow, install.check_tpu_build):
        message = _error(check, installed)
        for words in (f"{other} 2.21.0", "tensorflow-tpu 2.20.0", "overwrite each other",
                      f"pip uninstall -y {other},",
                      "pip install --force-reinstall --no-deps tensorflow-tpu==2.20.0"):
            assert words in message, message
    assert install.missing_tensorflow_message(installed) == message
    assert install.missing_tensorflow_message({"tensorflow": "2.21.0"}) == install.NO_TENSORFLOW


def test_this_environment_has_one_usable_build():
    found = install.installed_tensorflow()
    assert found and install.check_tensorflow() == found


def test_importing_install_imports_no_tensorflow():
    code = ("import sys; import sat_tf.install as i; i.installed_tensorflow(); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_tpu_strategy_on_another_build_fails_before_reaching_for_a_tpu():
    if set(install.installed_tensorflow()) & set(install.TPU_DISTRIBUTIONS):
        pytest.skip("this environment has the TPU build")
    from sat_tf import distribute
    with pytest.raises(install.TensorFlowInstallError, match="--tpu needs the tensorflow-tpu"):
        distribute._tpu_strategy("local")


# --- the command line -----------------------------------------------------------------------

def test_cli_maps_only_a_missing_tensorflow_and_install_errors():
    missing = ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
    assert cli._user_error(missing) == install.missing_tensorflow_message()
    other = ModuleNotFoundError("No module named 'tensorflow_text'", name="tensorflow_text")
    assert cli._user_error(other) is None   # a bug in sat-tf: keeps its traceback
    error = install.TensorFlowInstallError("--tpu needs the tensorflow-tpu build")
    assert cli._user_error(error) == "--tpu needs the tensorflow-tpu build"


def test_train_without_tensorflow_fails_in_one_line_naming_the_extras(tmp_path):
    fake = tmp_path / "no_tf" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'tensorflow'\", name='tensorflow')\n")
    env = {k: v for k, v in os.environ.items() if k != "SAT_TF_TRACEBACK"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(fake.parent),
                                                      env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run" / "train.py"), "--dataset=synthetic",
         f"--model_dir={tmp_path / 'run'}", "--train_steps=1"],
        capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), proc.stderr
    assert 'pip install -e ".[cpu]"' in lines[0] and '".[tpu]"' in lines[0]
    assert proc.stdout == ""
