"""The packed export: format, bit-exact reload through from_pretrained, training state, corrupt files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import tiny_mobilenet, tiny_resnet
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

import hf_lts
from hf_lts import LotteryTicketScratcher, LTSConfig, prepare_model
from hf_lts.export.packed import (
    TRAINING_BUFFERS,
    LTSCheckpointError,
    codes_per_byte,
    export_levels,
    pack_codes,
    save_export,
    unpack_codes,
)
from hf_lts.quantization import quantized_layers
from hf_lts.quantizers import LTSHfQuantizer, training_state

BUILDERS = {"resnet": tiny_resnet, "mobilenet": tiny_mobilenet}


def train_briefly(model, config: LTSConfig, steps: int = 3, seed: int = 0):
    """Prepare, take a few SGD steps with the scratcher, freeze ~30 % of every layer, step once more (so
    step sizes move away from the frozen latents), and return the model in eval mode with an input."""
    prepare_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 32, 32, generator=generator)
    labels = torch.randint(0, model.config.num_labels, (6,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scratcher = LotteryTicketScratcher(model, total_steps=steps + 1)
    model.train()
    for step in range(steps + 1):
        if step == steps:
            for layer in quantized_layers(model).values():
                layer.freeze_(torch.rand(layer.weight.shape, generator=generator) < 0.3)
        model(pixel_values=x, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scratcher.step()
    return model.eval(), x


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).logits


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A W2A2 per-channel tiny ResNet export, its logits and input (shared by the read-only tests)."""
    model, x = train_briefly(tiny_resnet(), LTSConfig(weight_bits=2, activation_bits=3, per_channel=True))
    folder = tmp_path_factory.mktemp("export")
    model.save_pretrained(folder)
    return folder, logits(model, x), x, model


def copy_export(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("config.json", "model.safetensors"):
        (dest / name).write_bytes((folder / name).read_bytes())
    return dest


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (37,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (-(-37 // codes_per_byte(bits)),)
    assert codes_per_byte(bits) == {2: 4, 3: 2, 4: 2}.get(bits, 1)
    unpacked = unpack_codes(packed, bits)
    assert torch.equal(unpacked[:37], codes.int()) and not unpacked[37:].any()


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("arch", BUILDERS)
def test_from_pretrained_reproduces_logits_bit_for_bit(tmp_path, arch, bits, per_channel):
    model, x = train_briefly(
        BUILDERS[arch](), LTSConfig(weight_bits=bits, activation_bits=bits, per_channel=per_channel)
    )
    assert any(layer.num_frozen for layer in quantized_layers(model).values())
    model.save_pretrained(tmp_path)

    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)

    assert torch.equal(logits(loaded, x), logits(model, x))
    assert isinstance(loaded.hf_quantizer, LTSHfQuantizer) and loaded.lts_config == model.lts_config
    for name, layer in quantized_layers(loaded).items():
        assert torch.equal(layer.weight_levels, export_levels(quantized_layers(model)[name]))


def test_layers_kept_in_fp32_are_stored_as_float_weights(tmp_path):
    config = LTSConfig(
        weight_bits=3, first_layer_bits=None, last_layer_bits=None, modules_to_not_convert=["shortcut"]
    )
    model, x = train_briefly(tiny_resnet(), config)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for name in (
        "resnet.embedder.embedder.convolution",
        "classifier.1",
        "resnet.encoder.stages.1.layers.0.shortcut.convolution",
    ):
        assert (
            tensors[f"{name}.weight"].dtype == torch.float32
            and f"{name}.weight_quantizer.scale" not in tensors
        )
    assert torch.equal(logits(AutoModelForImageClassification.from_pretrained(tmp_path), x), logits(model, x))


def test_export_holds_packed_codes_steps_and_no_training_state(export):
    folder, _, _, model = export
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config == {
        **model.lts_config.to_dict(),
        "hf_lts_version": hf_lts.__version__,
        "torch_version": torch.__version__,
    }
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert metadata["lts_format"] == "packed-v1"
    layers = quantized_layers(model)
    assert json.loads(metadata["lts_layers"]) == {
        n: {"weight_bits": m.weight_quantizer.bits, "activation_bits": m.input_quantizer.bits}
        for n, m in layers.items()
    }
    assert json.loads(metadata["lts_stats"])["frozen_ratio"] > 0
    for name, layer in layers.items():
        packed = tensors[f"{name}.weight"]
        assert packed.dtype == torch.uint8 and packed.numel() == -(
            -layer.weight.numel() // codes_per_byte(layer.weight_quantizer.bits)
        )
        assert tensors[f"{name}.weight_quantizer.scale"].shape == (layer.weight.shape[0],)
        assert {f"{name}.input_quantizer.{k}" for k in ("scale", "signed", "initialized")} <= tensors.keys()
        assert not any(f"{name}.{b}" in tensors for b in TRAINING_BUFFERS)
    assert "resnet.embedder.embedder.normalization.running_var" in tensors


def test_reloaded_model_restarts_training_from_dequantized_weights(export):
    folder, _, _, model = export
    loaded = AutoModelForImageClassification.from_pretrained(folder)
    for name, layer in quantized_layers(loaded).items():
        scale = (
            layer.weight_quantizer.scale.view(-1, 1, 1, 1)
            if layer.weight.ndim == 4
            else layer.weight_quantizer.scale.view(-1, 1)
        )
        assert torch.equal(layer.weight, layer.weight_levels.float() * scale)
        assert layer.num_frozen == 0 and int(layer.lts_step) == 0 and float(layer.lts_frozen_steps) == 0
        assert torch.equal(layer.weight_quantizer.scale, quantized_layers(model)[name].weight_quantizer.scale)
    # transformers lets a Trainer fine-tune it: the quantizer declares QAT support
    from transformers.trainer_utils import validate_quantization_for_training

    validate_quantization_for_training(loaded)


def test_reloaded_model_fine_tunes_with_lts_trainer(export, tmp_path):
    folder, _, x, _ = export
    loaded = AutoModelForImageClassification.from_pretrained(folder)
    before = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    data = [{"pixel_values": x[i], "labels": i % 5} for i in range(len(x))]
    args = hf_lts.LTSTrainingArguments(
        tmp_path / "out",
        max_steps=2,
        per_device_train_batch_size=3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    trainer = hf_lts.LTSTrainer(model=loaded, args=args, train_dataset=data)
    trainer.train()
    assert trainer.scratcher.step_count == 2
    assert any(not torch.equal(before[n], p) for n, p in loaded.named_parameters())


def test_training_state_saves_and_reloads_the_full_state(tmp_path):
    model, x = train_briefly(tiny_mobilenet(), LTSConfig(weight_bits=2, activation_bits=2))
    with training_state(model):
        model.save_pretrained(tmp_path)
    assert "lts_format" not in (safe_open(tmp_path / "model.safetensors", framework="pt").metadata() or {})
    assert load_file(tmp_path / "model.safetensors").keys() == model.state_dict().keys()

    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert sum(layer.num_frozen for layer in quantized_layers(loaded).values()) > 0


def test_sharded_export_loads_and_dtype_stays_float32(export, tmp_path):
    _, expected, x, model = export
    model.save_pretrained(tmp_path, max_shard_size=1000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.float32
    assert torch.equal(logits(loaded, x), expected)


def test_from_pretrained_with_lts_config_prepares_a_float_model(tmp_path):
    tiny_resnet().save_pretrained(tmp_path)
    model = AutoModelForImageClassification.from_pretrained(
        tmp_path, quantization_config=LTSConfig(weight_bits=3)
    )
    convs_and_linears = [
        m for m in tiny_resnet().modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    assert model.lts_config.weight_bits == 3 and len(quantized_layers(model)) == len(convs_and_linears)
    model.save_pretrained(tmp_path / "export")
    assert (
        safe_open(tmp_path / "export" / "model.safetensors", framework="pt").metadata()["lts_format"]
        == "packed-v1"
    )


def test_plain_transformers_refuses_the_export(export):
    """A process that never imports hf_lts must not load the codes as weights."""
    folder, *_ = export
    code = (
        "import sys\n"
        "from transformers import AutoModelForImageClassification\n"
        "try:\n"
        f"    AutoModelForImageClassification.from_pretrained({str(folder)!r})\n"
        "except RuntimeError as e:\n"
        "    assert 'hf_lts' not in sys.modules\n"
        "    print('REFUSED', e)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert "REFUSED" in result.stdout and "mismatch" in result.stdout + result.stderr, result.stderr[-2000:]


def rewrite(folder: Path, change) -> None:
    """Apply ``change(tensors, metadata)`` to the export's safetensors file."""
    path = folder / "model.safetensors"
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


LAYER = "resnet.encoder.stages.0.layers.0.layer.1.convolution"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t, m: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"][:-1]}),
            f"'{LAYER}.weight' has shape",
        ),
        (lambda t, m: t.pop(f"{LAYER}.input_quantizer.scale"), f"no tensor '{LAYER}.input_quantizer.scale'"),
        (
            lambda t, m: t.pop("resnet.embedder.embedder.normalization.running_var"),
            "no tensor 'resnet.embedder.embedder.normalization.running_var'",
        ),
        (
            lambda t, m: t.update(
                {f"{LAYER}.weight_quantizer.scale": t[f"{LAYER}.weight_quantizer.scale"].half()}
            ),
            "has dtype F16",
        ),
        (
            lambda t, m: t[f"{LAYER}.weight_quantizer.scale"].fill_(float("nan")),
            f"'{LAYER}.weight_quantizer.scale' has non-positive",
        ),
        (
            lambda t, m: m.update(
                lts_layers=m["lts_layers"].replace('"weight_bits": 2', '"weight_bits": 4', 1)
            ),
            "exported as W4A3 but config.json's quantization_config gives W2A3",
        ),
    ],
    ids=[
        "wrong-shape",
        "missing-quantizer-tensor",
        "missing-norm-tensor",
        "wrong-dtype",
        "bad-scale",
        "bits-vs-config",
    ],
)
def test_corrupt_or_mismatched_files_raise_naming_the_tensor(export, tmp_path, change, message):
    folder = copy_export(export[0], tmp_path / "copy")
    rewrite(folder, change)
    with pytest.raises(LTSCheckpointError, match=message):
        AutoModelForImageClassification.from_pretrained(folder)


def test_bits_in_config_json_must_match_the_weights(export, tmp_path):
    folder = copy_export(export[0], tmp_path / "copy")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["weight_bits"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        LTSCheckpointError, match="exported as W2A3 but config.json's quantization_config gives W4A3"
    ):
        AutoModelForImageClassification.from_pretrained(folder)


def test_4_bit_codes_relabelled_as_3_bit_are_caught(tmp_path):
    """3- and 4-bit codes pack to the same size: the codes themselves are range-checked."""
    prepare_model(tiny_resnet(), LTSConfig(weight_bits=4, activation_bits=4)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["weight_bits"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    rewrite(
        tmp_path,
        lambda t, m: m.update(lts_layers=m["lts_layers"].replace('"weight_bits": 4', '"weight_bits": 3')),
    )
    with pytest.raises(LTSCheckpointError, match="holds codes ≥ 8, impossible at 3 bits"):
        AutoModelForImageClassification.from_pretrained(tmp_path)


def test_truncated_file_raises(export, tmp_path):
    folder = copy_export(export[0], tmp_path / "copy")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LTSCheckpointError, match="model.safetensors is not a readable safetensors file"):
        AutoModelForImageClassification.from_pretrained(folder)


def test_save_export_replaces_files_atomically_and_keeps_them_on_failure(export, tmp_path):
    folder, _, x, model = export
    save_export(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert torch.equal(logits(AutoModelForImageClassification.from_pretrained(tmp_path), x), export[1])

    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    broken = tiny_resnet()
    prepare_model(broken, LTSConfig())
    broken.lts_config.weight_bits = 3  # the layers are 4-bit: the export refuses
    with pytest.raises(ValueError, match="config was changed after prepare_model"):
        save_export(broken, tmp_path)
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == before


def test_resnet18_w2a2_export_is_under_a_tenth_of_fp32(tmp_path):
    torch.manual_seed(0)
    config = ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], num_labels=1000
    )
    ResNetForImageClassification(config).save_pretrained(tmp_path / "fp32")
    model = prepare_model(ResNetForImageClassification(config), LTSConfig(weight_bits=2, activation_bits=2))
    model.save_pretrained(tmp_path / "w2a2")
    ratio = (tmp_path / "w2a2" / "model.safetensors").stat().st_size / (
        tmp_path / "fp32" / "model.safetensors"
    ).stat().st_size
    assert ratio <= 0.10
