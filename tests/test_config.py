import json

import pytest
from transformers import ResNetConfig
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_lts import LTSConfig


def test_defaults_and_registration():
    config = LTSConfig()
    assert isinstance(config, QuantizationConfigMixin)
    assert config.quant_method == "lts"
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["lts"] is LTSConfig
    assert (config.weight_bits, config.activation_bits) == (4, 4)
    assert (config.first_layer_bits, config.last_layer_bits) == (8, 8)
    assert config.per_channel is False and config.freeze is True
    assert config.freeze_schedule == "linear"
    assert (config.freeze_threshold, config.distance_momentum, config.freeze_warmup_ratio) == (0.1, 0.99, 0.2)
    assert config.modules_to_not_convert == []


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("weight_bits", 1, "2 to 8"),
        ("weight_bits", 9, "2 to 8"),
        ("weight_bits", 2.5, "2 to 8"),
        ("weight_bits", True, "2 to 8"),
        ("activation_bits", 0, "2 to 8"),
        ("first_layer_bits", 16, "or None"),
        ("last_layer_bits", 1, "or None"),
        ("freeze_schedule", "cosine", "'linear', 'sine', 'constant'"),
        ("distance_momentum", 1.0, "[0, 1)"),
        ("distance_momentum", -0.1, "[0, 1)"),
        ("freeze_warmup_ratio", 1.0, "[0, 1)"),
        ("freeze_threshold", 1.5, "[0, 1]"),
        ("freeze_threshold", -0.01, "[0, 1]"),
        ("modules_to_not_convert", [3], "list of module-name"),
    ],
)
def test_validation_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as err:
        LTSConfig(**{field: value})
    message = str(err.value)
    assert f"LTSConfig.{field}={value!r}" in message
    assert allowed in message


def test_fp32_first_and_last_layers_are_allowed():
    config = LTSConfig(first_layer_bits=None, last_layer_bits=None)
    assert config.first_layer_bits is None and config.last_layer_bits is None


def test_round_trip_dict_and_json():
    config = LTSConfig(
        weight_bits=2,
        activation_bits=3,
        first_layer_bits=None,
        per_channel=True,
        freeze_schedule="sine",
        distance_momentum=0.9999,
        modules_to_not_convert=["classifier", "*.shortcut.*"],
    )
    d = config.to_dict()
    assert d["quant_method"] == "lts"
    assert LTSConfig.from_dict(d) == config
    assert LTSConfig.from_dict(json.loads(config.to_json_string())) == config
    again, unused = LTSConfig.from_dict(d, return_unused_kwargs=True, weight_bits=8, other=1)
    assert again.weight_bits == 8 and unused == {"other": 1}


def test_from_dict_validates():
    with pytest.raises(ValueError, match="weight_bits=12"):
        LTSConfig.from_dict({"weight_bits": 12})


def test_round_trip_through_model_config_json(tmp_path):
    config = LTSConfig(weight_bits=3, freeze_schedule="constant", freeze_threshold=0.05)
    model_config = ResNetConfig(num_labels=3)
    model_config.quantization_config = config
    model_config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"] == config.to_dict()
    assert LTSConfig.from_dict(saved["quantization_config"]) == config
