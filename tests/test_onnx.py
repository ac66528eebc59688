"""ONNX QDQ export: the file passes onnx.checker, runs in ONNX Runtime (CPU) and agrees with PyTorch."""

import sys
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers.hub_server import HubServer
from helpers.tiny_models import tiny_mobilenet, tiny_resnet
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from onnx import numpy_helper
from transformers import AutoModelForImageClassification

import hf_lts
from hf_lts import LotteryTicketScratcher, LTSConfig, export_onnx, prepare_model
from hf_lts.card import add_deploy_section, build_model_card
from hf_lts.cli import main as cli_main
from hf_lts.export.onnx import integer_type
from hf_lts.export.packed import export_levels, save_export
from hf_lts.hub import push_export
from hf_lts.quantization import quantized_layers
from hf_lts.quantizers import training_state

# MobileNetV2 without TensorFlow's size-dependent padding: free height and width (see the fixed-size test).
BUILDERS = {"resnet": tiny_resnet, "mobilenet": partial(tiny_mobilenet, tf_padding=False)}
_TYPE_NAMES = {onnx.TensorProto.DataType.Value(n.upper()): n for n in ("int2", "int4", "int8")}


def trained(build, config: LTSConfig, steps: int = 3, seed: int = 0):
    """Prepare, take a few SGD steps with the scratcher (some weights frozen), return it in eval mode."""
    model = prepare_model(build(num_labels=10, seed=seed), config)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (8,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scratcher = LotteryTicketScratcher(model, total_steps=steps)
    model.train()
    for _ in range(steps):
        model(pixel_values=x, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scratcher.step()
    for layer in quantized_layers(model).values():  # and a third of every layer frozen
        layer.freeze_(torch.rand(layer.weight.shape, generator=generator) < 0.3)
    return model.eval()


def run_onnx(path: Path, pixels: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixel_values": pixels.numpy()})[0]


def check_agreement(model, path: Path, pixels: torch.Tensor) -> float:
    """ONNX Runtime's logits against PyTorch's, at the example's batch and another (the batch is dynamic):
    the same top-1 everywhere; returns the max |logit difference|."""
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits.numpy()
    got = np.concatenate([run_onnx(path, pixels[:1]), run_onnx(path, pixels[1:])])
    assert got.shape == expected.shape
    assert (got.argmax(1) == expected.argmax(1)).all()
    diff = np.abs(got - expected)
    scale = 1 + np.abs(expected).max()
    # Accumulation order only: nearly all logits agree to float precision. A pre-activation that lands on a
    # rounding boundary may take the neighbouring level in one runtime, which moves a few logits a little.
    # The int8 form rounds biases to int32 where that moves a pre-activation by ≤ 1e-3 of an output step
    # (onnx_int8.BIAS_TOLERANCE): a few more values sit that close to a boundary.
    native = dict((p.key, p.value) for p in onnx.load(path).metadata_props)["hf_lts.weight_type"] == "native"
    assert np.quantile(diff, 0.99) <= (1e-4 if native else 1e-3) * scale and diff.max() <= 0.1 * scale
    return float(diff.max())


def weight_initializers(proto) -> list[np.ndarray]:
    """The weight initializers: integer tensors of ≥ 2 dims dequantized by a DequantizeLinear."""
    inits = {t.name: t for t in proto.graph.initializer}
    return [
        inits[n.input[0]]
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) > 1
    ]


CASES = {  # both models, per tensor and per channel, in the default suite
    "resnet-w2a2-tensor": ("resnet", 2, 2, False),
    "resnet-w8a8-channel": ("resnet", 8, 8, True),
    "mobilenet-w4a4-channel": ("mobilenet", 4, 4, True),
    "mobilenet-w2a2-tensor": ("mobilenet", 2, 2, False),
}


FULL_GRID = {
    f"{arch}-w{bits}a{bits}-{'channel' if per_channel else 'tensor'}": (arch, bits, bits, per_channel)
    for arch in BUILDERS
    for bits in (2, 4, 8)
    for per_channel in (False, True)
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_runs_on_integer_kernels_with_the_trained_levels(case, tmp_path):
    check_case(CASES[case], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in FULL_GRID if c not in CASES])
def test_every_model_bits_and_granularity(case, tmp_path):
    check_case(FULL_GRID[case], tmp_path)


def optimized_ops(path: Path) -> list[str]:
    """The operators ONNX Runtime runs (CPU provider, default optimisations) for the file at ``path``."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def holds_levels(init, levels: np.ndarray) -> bool:
    """Whether an initializer holds ``levels`` as ONNX Runtime's kernels want them: per output channel
    ``k · q`` for a non-zero integer ``k`` (int8; a negative ``k`` where a batch norm's scale is negative), or
    ``±q + 128`` (uint8, for ConvInteger)."""
    stored = numpy_helper.to_array(init).astype(np.int64)
    if stored.shape != levels.shape:
        return False
    stored = (stored - 128 if init.data_type == onnx.TensorProto.UINT8 else stored).reshape(len(levels), -1)
    flat = levels.reshape(len(levels), -1).astype(np.int64)
    for row, q in zip(stored, flat, strict=True):
        k = row[np.flatnonzero(q)[0]] // q[np.flatnonzero(q)[0]] if q.any() else 1
        if (
            k == 0
            or not np.array_equal(row, k * q)
            or (init.data_type == onnx.TensorProto.UINT8 and abs(k) != 1)
        ):
            return False
    return True


def check_case(case: tuple[str, int, int, bool], tmp_path: Path) -> None:
    arch, wbits, abits, per_channel = case
    model = trained(
        BUILDERS[arch], LTSConfig(weight_bits=wbits, activation_bits=abits, per_channel=per_channel)
    )
    pixels = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    path = export_onnx(model, tmp_path / "export", example_inputs=pixels[:2])

    assert path == tmp_path / "export" / "model.onnx"
    assert b"site-packages" not in path.read_bytes()  # no stack traces with local paths
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 21
    layers = quantized_layers(model)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == len(layers)  # one per quantized layer input
    assert "BatchNormalization" not in ops  # folded into the weight steps and biases
    # Every layer's integer levels are an initializer: int8 (uint8 for ConvInteger), the trained levels.
    inits = [t for t in proto.graph.initializer if len(t.dims) > 1]
    for name, layer in layers.items():
        levels = export_levels(layer).numpy()
        assert any(holds_levels(t, levels) for t in inits), f"{name}: no initializer holds its levels"
    # ONNX Runtime runs every quantized convolution on an integer kernel (QLinearConv, or ConvInteger where
    # the output stays float or an int32 bias would not be exact enough): no float Conv.
    optimized = optimized_ops(path)
    assert "Conv" not in optimized and "BatchNormalization" not in optimized
    assert {"QLinearConv", "ConvInteger"} & set(optimized)
    check_agreement(model, path, pixels)
    bigger = torch.randn(5, 3, 48, 40, generator=torch.Generator().manual_seed(2))  # height and width free
    check_agreement(model, path, bigger)


def test_native_types_keep_int2_int4_levels(tmp_path):
    """``weight_type="native"``: the smallest ONNX type per bit width (int2 at opset 25), batch norms kept."""
    model = trained(tiny_resnet, LTSConfig(weight_bits=2, activation_bits=4, per_channel=True))
    pixels = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    path = export_onnx(model, tmp_path / "native.onnx", example_inputs=pixels[:2], weight_type="native")
    proto = onnx.load(path)
    assert proto.opset_import[0].version == 25
    layers = quantized_layers(model)
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) > 0
    for name, layer in layers.items():
        levels = export_levels(layer).numpy()
        expected = integer_type(layer.weight_quantizer.bits, True, 25)[0]
        assert any(
            _TYPE_NAMES[t.data_type] == expected
            and tuple(t.dims) == levels.shape
            and np.array_equal(numpy_helper.to_array(t).astype(np.int32), levels)
            for t in weight_initializers(proto)
        ), f"{name}: no {expected} initializer holds its levels"
    check_agreement(model, path, pixels)
    with pytest.raises(ValueError, match=r"weight_type must be one of \('int8', 'native'\), not 'int4'"):
        export_onnx(model, tmp_path / "other.onnx", weight_type="int4")


def test_negative_batch_norm_scales_at_8_bits(tmp_path):
    """A batch norm with negative scales: below 8 bits the channel's levels are negated; at 8 bits a channel
    with a level of -128 keeps its levels and takes a negative step. ONNX Runtime computes both exactly."""
    model = prepare_model(
        tiny_resnet(num_labels=10), LTSConfig(weight_bits=8, activation_bits=8, per_channel=True)
    )
    model.train()(pixel_values=torch.randn(8, 3, 32, 32))  # batch-norm statistics, activation steps
    model.eval()
    conv = model.resnet.encoder.stages[0].layers[0].layer[0]  # conv → batch norm → ReLU → quantizer
    trainable = (~conv.convolution.frozen_mask).flatten(1)
    first, second = trainable.any(1).nonzero()[:2, 0].tolist()  # channels with a weight set from its latent
    with torch.no_grad():
        conv.normalization.weight[[first, second]] *= -1
        step = conv.convolution.weight_quantizer.scale[first]
        weight = conv.convolution.weight
        weight.view(len(weight), -1)[first, trainable[first].nonzero()[0, 0]] = -200 * step  # level -128
        weight[second].clamp_(min=-100 * conv.convolution.weight_quantizer.scale[second])
    levels = export_levels(conv.convolution)
    assert levels[first].min() == -128 and levels[second].min() > -128
    pixels = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    path = export_onnx(model, tmp_path / "negative.onnx", example_inputs=pixels[:2])
    proto = onnx.load(path)
    stored = [t for t in proto.graph.initializer if holds_levels(t, levels.numpy())]
    assert len(stored) == 1
    rows = numpy_helper.to_array(stored[0]).astype(np.int64).reshape(len(levels), -1)
    rows -= 128 if stored[0].data_type == onnx.TensorProto.UINT8 else 0
    flat = levels.flatten(1).numpy()
    ratio = [rows[c][flat[c] != 0][0] / flat[c][flat[c] != 0][0] for c in (first, second)]
    assert ratio[0] > 0 and ratio[1] < 0  # -128 kept (a negative step instead), the other channel negated
    check_agreement(model, path, pixels)


def test_architecture_that_fixes_the_size_says_so(tmp_path):
    """transformers' MobileNetV2 with tf_padding=True computes its padding from the input size as Python
    numbers: the graph would run at any size, wrongly. One clear error, nothing written; the export at the
    example's size on request."""
    model = trained(tiny_mobilenet, LTSConfig(weight_bits=4, activation_bits=4))
    pixels = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with pytest.raises(
        ValueError, match=r"fixes its input's height and width .* dynamic_size=False .*\(32×32\)"
    ):
        export_onnx(model, tmp_path / "fixed.onnx", example_inputs=pixels[:2])
    assert not any(tmp_path.iterdir())
    path = export_onnx(model, tmp_path / "fixed.onnx", example_inputs=pixels[:2], dynamic_size=False)
    assert [d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim[2:]] == [32, 32]
    assert "QLinearConv" in optimized_ops(path)  # its padding moved behind the quantizers
    check_agreement(model, path, pixels)


def test_bit_widths_without_their_own_type_are_clipped_to_the_trained_range(tmp_path):
    """Native types: 3-bit weights in int4, 5-bit inputs in uint8/int8, 2-bit in int4 at opset 23. In int8
    containers: a uint8 clamp after each quantizer whose bit width is below 8. A first layer kept in fp32
    stays a float convolution either way."""
    config = LTSConfig(weight_bits=3, activation_bits=5, first_layer_bits=None, last_layer_bits=2)
    model = trained(tiny_resnet, config)
    pixels = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    path = export_onnx(model, tmp_path / "w3a5-int8.onnx", example_inputs=pixels[:2], opset=23)
    proto = onnx.load(path)
    inits = {t.name: t for t in proto.graph.initializer}
    clamps = [n for n in proto.graph.node if n.op_type == "Clip"]
    assert len(clamps) == len(quantized_layers(model))  # every layer's input has fewer than 8 bits
    assert all(inits[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in clamps)
    assert sum(op == "Conv" for op in optimized_ops(path)) == 1  # the fp32 first layer only
    check_agreement(model, path, pixels)
    path = export_onnx(
        model, tmp_path / "w3a5.onnx", example_inputs=pixels[:2], opset=23, weight_type="native"
    )
    proto = onnx.load(path)
    assert proto.opset_import[0].version == 23
    layers = quantized_layers(model)
    assert "resnet.embedder.embedder.convolution" not in layers
    assert [_TYPE_NAMES.get(t.data_type) for t in weight_initializers(proto)] == ["int4"] * len(layers)
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) == len(layers)
    assert sum(n.op_type == "Clip" for n in proto.graph.node) >= len(layers)
    check_agreement(model, path, pixels)


def test_digits_top1_equals_pytorch(tmp_path):
    """A model trained on real data (scikit-learn's digits): ONNX Runtime gives PyTorch's top-1."""
    from hf_lts.data import load_image_dataset, prepare_dataset

    data = load_image_dataset("digits", seed=0)
    train = prepare_dataset(data["train"], 32, train=False)[:]
    val = prepare_dataset(data["validation"], 32, train=False)[:]
    generator = torch.Generator().manual_seed(0)

    def fit(model, steps: int, lr: float, scratcher=None) -> None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        model.train()
        for _ in range(steps):
            batch = torch.randint(0, len(train["labels"]), (32,), generator=generator)
            model(pixel_values=train["pixel_values"][batch], labels=train["labels"][batch]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if scratcher is not None:
                scratcher.step()

    model = tiny_resnet(num_labels=10)
    fit(model, 60, 0.1)  # fp32, then LTS W4A4 fine-tuning, as in practice
    model = prepare_model(model, LTSConfig(weight_bits=4, activation_bits=4))
    fit(model, 30, 0.01, LotteryTicketScratcher(model, total_steps=30))
    model.eval()
    path = export_onnx(model, tmp_path, example_inputs=val["pixel_values"][:2])
    with torch.no_grad():
        expected = model(pixel_values=val["pixel_values"]).logits.numpy()
    got = run_onnx(path, val["pixel_values"])
    labels = val["labels"].numpy()
    top1_torch = (expected.argmax(1) == labels).mean()
    assert top1_torch > 0.3  # it learned something (chance: 0.1)
    assert (got.argmax(1) == labels).mean() == top1_torch
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.999
    print(f"digits: top-1 {top1_torch:.4f}, max |logit diff| {np.abs(got - expected).max():.2e}")


def test_bad_input_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"not prepared for LTS: call hf_lts.prepare_model"):
        export_onnx(tiny_resnet(), tmp_path)
    unseen = prepare_model(tiny_resnet(), LTSConfig())
    with pytest.raises(ValueError, match=r"has not seen data yet .* before exporting"):
        export_onnx(unseen, tmp_path)
    model = trained(tiny_resnet, LTSConfig(weight_bits=4, activation_bits=8), steps=1)
    with pytest.raises(ValueError, match=r"opset 20 is too old for the int8 form: .* pass opset=21 or newer"):
        export_onnx(model, tmp_path, opset=20)
    with pytest.raises(ValueError, match=r"opset 20 is too old for 4-bit levels: .* pass opset=21 or newer"):
        export_onnx(model, tmp_path, opset=20, weight_type="native")
    with pytest.raises(ValueError, match=r"opset 17 is too old: torch.onnx.export writes opset 18"):
        export_onnx(model, tmp_path, opset=17)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the [onnx] extra were not installed
    with pytest.raises(ImportError, match=r"optional dependency 'onnxscript': pip install 'hf-lts\[onnx\]'"):
        export_onnx(model, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written by any failed export


def test_cli_export_from_a_folder_and_from_the_hub_then_push(hub_server: HubServer, tmp_path, capsys):
    model = trained(tiny_resnet, LTSConfig(weight_bits=2, activation_bits=2))
    save_export(model, tmp_path / "export")
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    assert cli_main(["export", "--format", "onnx", str(tmp_path / "export"), "--image-size", "32"]) == 0
    assert "model.onnx" in capsys.readouterr().out
    check_agreement(model, tmp_path / "export" / "model.onnx", pixels)

    # push: the ONNX file goes up with the packed export; the card gets its "Deploy" section.
    push_export(tmp_path / "export", "test-user/onnx-lts")
    assert {"model.onnx", "model.safetensors", "README.md"} <= set(
        HfApi().list_repo_files("test-user/onnx-lts")
    )
    card = ModelCard.load(hf_hub_download("test-user/onnx-lts", "README.md"))
    assert "## Deploy" in card.text and 'hf_hub_download("test-user/onnx-lts", "model.onnx")' in card.text
    assert card.text.index("## Deploy") < card.text.index("## Citation")
    snippet = card.text.split("## Deploy")[1].split("```python\n")[1].split("```")[0]
    exec(snippet, {})  # the card's ONNX Runtime snippet runs as printed (against the local Hub)
    assert len(capsys.readouterr().out.strip().strip("[]").split()) == 4  # four predictions

    # From a Hub id: the packed export and model.onnx land side by side in --output.
    out = tmp_path / "from-hub"
    assert (
        cli_main(
            ["export", "--format", "onnx", "test-user/onnx-lts", "--output", str(out), "--image-size", "32"]
        )
        == 0
    )
    assert {"config.json", "model.safetensors", "model.onnx"} <= {p.name for p in out.iterdir()}
    loaded = AutoModelForImageClassification.from_pretrained(out)
    check_agreement(loaded.eval(), out / "model.onnx", pixels)

    # From a training checkpoint (full state): model.onnx is written into it, nothing else is touched.
    with training_state(model):
        model.save_pretrained(tmp_path / "checkpoint-3")
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-3").iterdir()}
    assert cli_main(["export", "--format", "onnx", str(tmp_path / "checkpoint-3"), "--image-size", "32"]) == 0
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-3").iterdir()}
    assert after.pop("model.onnx") and after == before
    check_agreement(model, tmp_path / "checkpoint-3" / "model.onnx", pixels)

    capsys.readouterr()
    assert cli_main(["export", "--format", "onnx", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-lts export: error: cannot export")


def test_trainer_push_to_hub_refreshes_and_uploads_model_onnx(hub_server: HubServer, tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": i % 10} for i in range(8)]
    args = hf_lts.LTSTrainingArguments(
        tmp_path / "run",
        max_steps=2,
        per_device_train_batch_size=4,
        save_strategy="no",
        hub_model_id="test-user/trainer-onnx",
        report_to=[],
        use_cpu=True,
    )
    trainer = hf_lts.LTSTrainer(
        model=tiny_resnet(num_labels=10),
        args=args,
        lts_config=LTSConfig(weight_bits=4, activation_bits=4),
        train_dataset=data,
    )
    trainer.train()
    pixels = torch.stack([d["pixel_values"] for d in data])
    export_onnx(trainer.model, tmp_path / "run", example_inputs=pixels[:2], opset=23)
    with torch.no_grad():  # the model moves on after the ONNX export: the pushed file must follow it
        next(iter(quantized_layers(trainer.model).values())).weight_quantizer.scale.mul_(1.5)
    trainer.push_to_hub()

    assert "model.onnx" in HfApi().list_repo_files("test-user/trainer-onnx")
    assert "## Deploy" in ModelCard.load(hf_hub_download("test-user/trainer-onnx", "README.md")).text
    pixels = torch.stack([d["pixel_values"] for d in data])
    check_agreement(
        trainer.model.eval(), Path(hf_hub_download("test-user/trainer-onnx", "model.onnx")), pixels
    )


def test_card_deploy_section(tmp_path):
    (tmp_path / "README.md").write_text("# m\n\n## How to use\n\nx\n\n## Citation\n\nc\n")
    assert not add_deploy_section(tmp_path, "me/m")  # no model.onnx: nothing to deploy
    (tmp_path / "model.onnx").write_bytes(b"")
    assert add_deploy_section(tmp_path, "me/m")
    text = (tmp_path / "README.md").read_text()
    assert text.index("## How to use") < text.index("## Deploy") < text.index("## Citation")
    assert 'hf_hub_download("me/m", "model.onnx")' in text
    assert not add_deploy_section(tmp_path, "me/m") and (tmp_path / "README.md").read_text() == text
    card = build_model_card(LTSConfig(), {}, repo_id="me/m", onnx=True)
    assert card.text.count("## Deploy") == 1
    assert "## Deploy" not in build_model_card(LTSConfig(), {}, repo_id="me/m").text


@pytest.mark.slow
def test_benchmark_quick_mode_runs(capsys):
    from benchmarks.onnx import main

    assert main(["--quick"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| demo-resnet")]
    assert len(row) == 1 and "| 100.00% |" in row[0]
