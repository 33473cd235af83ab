"""sat-tf: Smooth Adversarial Training in TensorFlow 2 / Keras 3."""
from setuptools import find_packages, setup

setup(
    name="sat_tf",
    version="0.1.0",
    description="Smooth Adversarial Training (Xie et al., 2020) for TensorFlow 2 / Keras 3",
    packages=find_packages(include=["sat_tf", "sat_tf.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.18,<2.22",
        "keras>=3.0",
        "tensorflow-datasets>=4.9",
        # tensorflow-datasets reads its checksum files through importlib_resources when it
        # downloads (CIFAR-10 on first use) but does not declare it.
        "importlib_resources",
        "absl-py>=1.0",
        "numpy>=1.23",
        # run/make_tfrecords.py re-encodes PNG / CMYK / grayscale images to RGB JPEG.
        "pillow>=9",
    ],
    extras_require={
        # scikit-learn ships two real JPEG photos (china.jpg, flower.jpg) that the
        # data tests build an ImageNet-style folder tree from; matplotlib for the figures.
        "test": ["pytest>=7", "scikit-learn>=1.0", "matplotlib>=3.5"],
        "plot": ["matplotlib>=3.5"],
    },
)
