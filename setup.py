"""sat-tf: Smooth Adversarial Training in TensorFlow 2 / Keras 3.

TensorFlow is not an unconditional requirement: its builds are different PyPI distributions
that install the same ``tensorflow`` package over each other, and pip does not know that. A
Cloud TPU VM needs ``tensorflow-tpu`` (releases up to 2.20), and requiring ``tensorflow``
here would make ``pip install`` put the CPU build over it ("TPUs not found"). So, as JAX
does, the build is an extra:

    pip install -e ".[cpu]"    # CPU; also GPUs when CUDA is installed on the machine
    pip install -e ".[gpu]"    # GPU, with CUDA and cuDNN from pip
    pip install -e ".[tpu]"    # Cloud TPU VM
"""
from setuptools import find_packages, setup

# The TensorFlow releases sat-tf supports: 2.18 (Keras 3 is tf.keras) to 2.21.
_TF = ">=2.18,<2.22"

setup(
    name="sat_tf",
    version="0.1.0",
    description="Smooth Adversarial Training (Xie et al., 2020) for TensorFlow 2 / Keras 3",
    packages=find_packages(include=["sat_tf", "sat_tf.*"]),
    python_requires=">=3.10",
    install_requires=[
        "keras>=3.0",
        "tensorflow-datasets>=4.9",
        # tensorflow-datasets reads its checksum files through importlib_resources when it
        # downloads (CIFAR-10 on first use) but does not declare it.
        "importlib_resources",
        "absl-py>=1.0",
        "numpy>=1.23",
        # run/make_tfrecords.py re-encodes PNG / CMYK / grayscale images to RGB JPEG.
        "pillow>=9",
        # The quick start's dataset: its real handwritten digits (sat_tf.data.digits) ship
        # inside scikit-learn, so the main job needs no download.
        "scikit-learn>=1.0",
    ],
    extras_require={
        # Exactly one TensorFlow build (see the module doc); CI installs ".[cpu,test]".
        "cpu": [f"tensorflow{_TF}"],
        "gpu": [f"tensorflow[and-cuda]{_TF}"],
        # tensorflow-tpu has no release after 2.20.
        "tpu": ["tensorflow-tpu>=2.18,<2.21"],
        # No TensorFlow here, so that ".[tpu,test]" keeps a TPU VM's build. scikit-learn
        # ships two real JPEG photos (china.jpg, flower.jpg) that the data tests build an
        # ImageNet-style folder tree from; matplotlib for the figures; setuptools because
        # tests/test_install.py builds this package's metadata from setup.py (Python >= 3.12
        # venvs come without it); the Adversarial Robustness Toolbox (numpy, scipy,
        # scikit-learn; no TensorFlow of its own) is the independent APGD and Square that
        # tests/test_autoattack_reference.py compares ours with.
        "test": ["pytest>=7", "scikit-learn>=1.0", "matplotlib>=3.5", "setuptools",
                 "adversarial-robustness-toolbox>=1.17"],
        "plot": ["matplotlib>=3.5"],
        # bench/step_time.py --peer=torch (the PyTorch CPU build is enough); not installed by CI.
        "bench": ["torch>=2.1"],
    },
)
