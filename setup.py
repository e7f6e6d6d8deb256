"""Installs the ``kfac`` package (pure Python; the optional C++/CUDA extension in csrc/ is built on demand)."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = next(line.split('"')[1] for line in (here / "kfac" / "__init__.py").read_text().splitlines()
               if line.startswith("__version__"))

setup(
    name="kfac",
    version=version,
    description="Distributed second-order optimization for PyTorch: K-FAC, EK-FAC, M-FAC and influence functions",
    long_description=(here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kfac", "kfac.*"]) + ["kfac.ext.csrc"],
    package_dir={"kfac.ext.csrc": "csrc"},  # the optional extension's sources ship inside the wheel: kfac/ext/csrc/
    package_data={"kfac.ext.csrc": ["*.h", "*.cpp", "*.cu"], "kfac": ["py.typed"]},
    python_requires=">=3.9",
    # safetensors: atomic, zero-copy factor files; tqdm: progress bars of influence fitting/scoring
    install_requires=["torch>=2.4", "numpy", "safetensors>=0.4", "tqdm"],
    extras_require={
        "examples": ["torchvision", "tensorboard", "tqdm", "matplotlib", "scikit-learn"],
        # peers of the time-to-result suite only (SOAP): a maintained implementation rather than our own copy;
        # kronfluence, traker (TRAK) and dattri: the attribution peers of benchmarks/cpu/lds_peers.py (the versions
        # it was run with)
        "benchmarks": ["pytorch-optimizer>=3.5", "matplotlib", "scikit-learn", "kronfluence==1.0.1", "traker==0.3.2",
                       "dattri==0.3.0"],
        # ruff and mypy run in `make test`: the layout and type rules are checked with the tests
        # transformers: tiny random GPT-2 / BERT / Llama configurations in the reach and influence tests (skipped
        # without it)
        "test": ["pytest>=7", "pytest-timeout", "scikit-learn", "ninja", "tensorboard", "ruff>=0.17,<0.18", "mypy>=2.4,<2.5",
                 "transformers>=4.40"],
    },
    license="MIT",
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
