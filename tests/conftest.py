"""Shared test setup: quiet TensorFlow, small shapes, offline by design."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def images(rng):
    """A small batch of RGB images in [0, 255]."""
    return rng.uniform(0, 255, size=(4, 64, 64, 3)).astype("float32")
