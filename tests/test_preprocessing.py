"""The input contract: kerastl's preprocessing equals Keras's own."""

import importlib

import keras
import numpy as np
import pytest

import kerastl
from kerastl.preprocessing import ImagePreprocessing

# Which keras.applications module's preprocess_input a constructor uses.
MODULES = {
    "ResNet": "resnet", "VGG16": "vgg16", "VGG19": "vgg19",
    "InceptionV3": "inception_v3", "InceptionResNetV2": "inception_resnet_v2",
    "Xception": "xception", "MobileNet": "mobilenet",
    "MobileNetV2": "mobilenet_v2", "DenseNet": "densenet", "NASNet": "nasnet",
    "EfficientNetV2": "efficientnet_v2", "EfficientNet": "efficientnet",
    "ConvNeXt": "convnext", "MobileNetV3": "mobilenet_v3",
}


def module_for(constructor):
    if constructor.startswith("ResNet") and constructor.endswith("V2"):
        return "resnet_v2"
    if constructor in MODULES:
        return MODULES[constructor]
    prefix = max((k for k in MODULES if constructor.startswith(k)), key=len)
    return MODULES[prefix]


@pytest.mark.parametrize("config", kerastl.list_configs("keras.applications"),
                         ids=lambda c: c.name)
def test_preprocessing_matches_keras_preprocess_input(config, images):
    module = importlib.import_module(
        f"keras.applications.{module_for(config.constructor)}")
    expected = module.preprocess_input(images.copy())
    got = ImagePreprocessing(config.preprocessing)(images)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), expected,
                               rtol=1e-5, atol=1e-4)


def test_uint8_input_is_accepted(images):
    layer = ImagePreprocessing("caffe")
    a = layer(images.round().astype("uint8"))
    b = layer(images.round())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                  keras.ops.convert_to_numpy(b))


def test_get_config_round_trip():
    layer = ImagePreprocessing("torch", zoo_name="densenet121", name="p")
    clone = ImagePreprocessing.from_config(layer.get_config())
    assert (clone.mode, clone.zoo_name, clone.name) == ("torch", "densenet121", "p")


def test_unknown_mode():
    with pytest.raises(kerastl.errors.ConfigError, match="caffe, tf, torch, unit, builtin"):
        ImagePreprocessing("bgr")
