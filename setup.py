"""kerastl: transfer learning with Keras 3 and TensorFlow, easy, correct and fast."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

PLOTS = ["matplotlib>=3.7"]
# kerastl.datasets needs scikit-learn (digits, sample photos) and matplotlib
# (fonts; it brings Pillow, which draws and resizes the images).
DATA = ["scikit-learn>=1.3"] + PLOTS
# KerasHub presets as a zoo source (load_backbone("kerashub:...")).
KERASHUB = ["keras-hub>=0.32"]
# kerastl.export(format="onnx"): Keras's ONNX export converts with tf2onnx
# (it brings onnx); onnxruntime runs the written file to check it.
ONNX = ["tf2onnx>=1.16", "onnxruntime>=1.17"]
# The LiteRT interpreter as its own package (TensorFlow's tf.lite.Interpreter
# is deprecated in its favour); kerastl falls back to TensorFlow's without it.
LITERT = ["ai-edge-litert>=1.2"]
# The documentation site (mkdocs.yml): MkDocs with the Material theme, the API
# reference from the docstrings (mkdocstrings-python) and the tutorials as
# pages (mkdocs-jupyter). Lower bounds: the oldest versions tests/test_docs.py
# passed with (pymdown-extensions 13.1, griffe 2.4); older mkdocstrings break
# on pymdown-extensions 13, older mkdocs-jupyter on the generated home page.
DOCS = ["mkdocs>=1.6.1", "mkdocs-material>=9.8", "mkdocstrings>=1.0.7",
        "mkdocstrings-python>=2.0", "mkdocs-jupyter>=0.26.2"]
# jax: the suite also runs kerastl on the Keras JAX backend (subprocess tests).
# nbclient, nbformat, ipykernel: CI executes the tutorial notebooks.
# pytest-xdist: the suite runs on two workers (pytest.ini), half the time on
# CI's two cores. pytest below 9.2: 9.2's node ids ignore the group suffix
# xdist's --dist loadgroup writes (pytest-dev/pytest-xdist#1386, fix not yet
# released), so every xdist_group is silently split across the workers and
# their session and module fixtures run once per test
# (tests/test_distribute.py fails if that happens again).
# pyflakes: the documentation's examples that need downloads are checked for
# undefined names (tests/test_readme.py); DOCS: tests/test_docs.py builds
# the site.
TEST = ["pytest>=7,<9.2", "pytest-xdist>=3.5", "jax>=0.4.30", "nbclient>=0.8",
        "nbformat>=5", "ipykernel>=6", "pyflakes>=3.2"] + DATA + KERASHUB + \
    ONNX + DOCS

setup(
    name="kerastl",
    version="0.1.0",
    description="Transfer learning with Keras 3: a model zoo with block maps, "
                "freezing, layer-wise learning rates and domain adaptation.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["kerastl", "kerastl.*"]) + [
        "kerastl.zoo_configs"],
    # The console script's launcher: outside the package so that it can
    # import kerastl lazily (see its docstring).
    py_modules=["kerastl_cli"],
    # The zoo configs live at the repository root (zoo_configs/) and are
    # installed inside the package as kerastl/zoo_configs.
    package_dir={"kerastl.zoo_configs": "zoo_configs"},
    package_data={"kerastl.zoo_configs": ["*.yaml", "*.json"]},
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.5",
        "tensorflow-hub>=0.16",
        "numpy",
        "pyyaml",
    ],
    extras_require={
        "test": TEST,
        "docs": DOCS,
        "plots": PLOTS,
        "data": DATA,
        "kerashub": KERASHUB,
        "onnx": ONNX,
        "litert": LITERT,
        "all": TEST + LITERT,
    },
    entry_points={"console_scripts": ["kerastl=kerastl_cli:main"]},
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: Keras",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
