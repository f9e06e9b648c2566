"""The suite's own setup (tests/conftest.py): TensorFlow's graph optimizer
(Grappler) is off, except in the tests marked ``grappler``, which compare
two graphs bit for bit and so run it as users do."""

import pytest
import tensorflow as tf

from conftest import GRAPPLER


def grappler_off():
    return tf.config.optimizer.get_experimental_options().get(
        "disable_meta_optimizer", False)


def test_grappler_is_off_in_an_unmarked_test():
    assert grappler_off() is not GRAPPLER


@pytest.mark.grappler
def test_grappler_is_on_in_a_marked_test():
    assert grappler_off() is False


def test_and_off_again_after_it():
    assert grappler_off() is not GRAPPLER
