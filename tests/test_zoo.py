"""transformers' image-classification zoo end to end, and the layer features it needs.

Every architecture of `tiny_zoo.ZOO`: `LTSTrainer` (a few steps, some weights frozen) → ``save_model`` (packed
export under the names transformers writes, with a model card) → ``from_pretrained`` after ``import hf_lts``
(bit-exact logits) → `export_onnx` → ONNX Runtime (same top-1, logits to float precision; two architectures
in the default suite, the others with ``-m slow``).
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_zoo import ZOO, image_size, tiny_zoo_model
from safetensors import safe_open
from test_onnx import check_agreement
from torch import nn
from torch.nn import functional as F
from transformers import Dinov2Config, Dinov2ForImageClassification

from hf_lts import LTSConfig, LTSTrainer, LTSTrainingArguments, QuantConv2d, export_onnx, prepare_model
from hf_lts.quantization import quantized_layers
from hf_lts.quantization.lsq import SCALE_EPS, quantize_levels

LABELS = 3


def train_with_trainer(model: nn.Module, config: LTSConfig, tmp_path, steps: int = 2) -> torch.Tensor:
    """A few LTSTrainer steps on random images; returns nine other images for the checks."""
    size = image_size(model)
    generator = torch.Generator().manual_seed(0)
    data = [
        {"pixel_values": torch.randn(3, size, size, generator=generator), "labels": i % LABELS}
        for i in range(4 * steps)
    ]
    args = LTSTrainingArguments(
        str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4, learning_rate=0.01,
        report_to="none", save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, seed=0,
    )  # fmt: skip
    trainer = LTSTrainer(model=model, args=args, lts_config=config, train_dataset=data)
    trainer.train()
    for layer in quantized_layers(model).values():  # and a share of every layer frozen
        layer.freeze_(torch.rand(layer.weight.shape, generator=generator) < 0.3)
    trainer.save_model(str(tmp_path / "export"))
    return torch.randn(9, 3, size, size, generator=generator)


#: ONNX export costs 3-10 s per model (torch.export, decomposition, the ONNX registry): the default suite
#: exports those that exercise what the others do not — TF-"SAME" input pads and folded weight
#: standardization (BiT), "same"/"valid" padding and depthwise convolutions (EfficientNet), model code that
#: reads a layer's weight (ViT), eager attention (Swin) — and ``-m slow`` the rest.
ONNX_IN_DEFAULT_SUITE = ("efficientnet", "vit")


def check_end_to_end(arch: str, tmp_path, onnx: bool) -> None:
    per_channel = list(ZOO).index(arch) % 2 == 1  # half of them per channel, half per tensor
    model = tiny_zoo_model(arch, num_labels=LABELS)
    plain_folder = tmp_path / "fp32"
    model.save_pretrained(plain_folder)  # the names transformers writes for this architecture
    config = LTSConfig(weight_bits=4, activation_bits=4, per_channel=per_channel)
    pixels = train_with_trainer(model, config, tmp_path)
    folder = tmp_path / "export"
    model.eval()
    assert (folder / "README.md").is_file()
    with safe_open(plain_folder / "model.safetensors", "pt") as plain:
        with safe_open(folder / "model.safetensors", "pt") as lts:
            assert set(plain.keys()) <= set(lts.keys())

    reloaded = type(model).from_pretrained(folder)
    assert set(quantized_layers(reloaded)) == set(quantized_layers(model))
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)

    if onnx:
        try:  # free height and width by default; an architecture that fixes them says so, and exports fixed
            path = export_onnx(model, tmp_path / "onnx", example_inputs=pixels[:2])
        except ValueError as err:
            assert "fixes its input's height and width" in str(err) and "dynamic_size=False" in str(err)
            path = export_onnx(model, tmp_path / "onnx", example_inputs=pixels[:2], dynamic_size=False)
        check_agreement(model, path, pixels)


@pytest.mark.parametrize("arch", list(ZOO))
def test_architecture_end_to_end(arch, tmp_path):
    check_end_to_end(arch, tmp_path, onnx=arch in ONNX_IN_DEFAULT_SUITE)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in ZOO if a not in ONNX_IN_DEFAULT_SUITE])
def test_architecture_onnx(arch, tmp_path):
    check_end_to_end(arch, tmp_path, onnx=True)


# -- padding and groups ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding="valid"),
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=4, padding="same"),  # asymmetric: one more at the bottom and right
        dict(kernel_size=(2, 3), padding="same", dilation=(3, 1)),
        dict(kernel_size=3, padding=(1, 2), padding_mode="reflect"),
        dict(kernel_size=3, padding=1, padding_mode="replicate", stride=2),
        dict(kernel_size=3, padding=2, padding_mode="circular"),
        dict(kernel_size=3, padding=1, groups=2),
        dict(kernel_size=3, padding="same", groups=4),
    ],
    ids=str,
)
def test_conv_padding_and_groups(kwargs):
    """A QuantConv2d computes what its Conv2d computes on the fake-quantized input and weight."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, **kwargs)
    reference = nn.Conv2d(8, 12, **kwargs)
    layer = QuantConv2d.from_float(conv, 4, 4, per_channel=True)
    x = torch.randn(2, 8, 9, 10)
    out = layer(x)
    aq, wq = layer.input_quantizer, layer.weight_quantizer
    x_hat = quantize_levels(x, aq.scale, aq.qmin, aq.qmax)[0] * aq.scale
    w_hat = quantize_levels(layer.weight, wq.scale, wq.qmin, wq.qmax)[0] * wq.scale.view(-1, 1, 1, 1)
    with torch.no_grad():
        reference.weight.copy_(w_hat)
        reference.bias.copy_(conv.bias)
        assert torch.allclose(out, reference(x_hat), atol=1e-5)
    out.sum().backward()
    assert layer.weight.grad.shape == layer.weight.shape and layer.input_quantizer.scale.grad is not None


# -- step sizes -------------------------------------------------------------------------------------------
def test_step_sizes_stay_positive_whatever_the_optimizer_does():
    model = prepare_model(tiny_zoo_model("levit", num_labels=LABELS), LTSConfig())
    layers = quantized_layers(model)
    steps = [
        p for layer in layers.values() for p in (layer.weight_quantizer.scale, layer.input_quantizer.scale)
    ]
    model(pixel_values=torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    before = steps[0].detach().clone()
    for optimizer in (torch.optim.SGD(steps, lr=1.0, momentum=0.9), torch.optim.Adam(steps[1:], lr=10.0)):
        for (
            p
        ) in steps:  # a gradient that would take every step far below zero, but one that moves it a little
            p.grad = torch.full_like(p, 1e3)
        steps[0].grad.fill_(1e-6)
        optimizer.step()
        assert all(bool((p == SCALE_EPS).all()) for p in steps[1:])
    assert torch.equal(steps[0], before - 1e-6)  # an update that keeps a step positive is untouched


# -- what cannot be supported: one clear error ---------------------------------------------------------------
class _ScaledConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * F.conv2d(x, self.weight, self.bias)


def test_a_layer_with_its_own_forward_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _ScaledConv(4, 4, 1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Layer '1' is a _ScaledConv.*modules_to_not_convert"):
        prepare_model(model, LTSConfig())
    assert type(model[1]) is _ScaledConv  # nothing was converted
    prepare_model(model, LTSConfig(modules_to_not_convert=["1"]))
    assert type(model[1]) is _ScaledConv and isinstance(model[0], QuantConv2d)


def test_layers_transformers_saves_fused_are_refused_by_name():
    config = Dinov2Config(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        use_swiglu_ffn=True,
    )
    with pytest.raises(ValueError, match=r"'dinov2.encoder.layer.0.mlp.(gate|up)_proj' weight fused"):
        prepare_model(Dinov2ForImageClassification(config), LTSConfig())


# -- training checkpoints of models transformers saves under other names ---------------------------------------
@pytest.mark.parametrize("matmuls", [False, True], ids=["linears", "attention-matmuls"])
def test_vit_checkpoint_resumes_exactly_and_loads(tmp_path, matmuls):
    """Checkpoints keep the model's own keys: the Trainer resumes them with ``load_state_dict``, which would
    silently skip ViT's attention projections saved under their original names. The attention matmuls'
    quantizers (``quantize_attention_matmuls``) are part of that state."""
    generator = torch.Generator().manual_seed(0)
    data = [
        {"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": i % LABELS} for i in range(16)
    ]

    def run(resume: str | None = None) -> nn.Module:
        args = LTSTrainingArguments(
            str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=0.01,
            report_to="none", save_strategy="steps", save_steps=2, disable_tqdm=True,
            dataloader_pin_memory=False, seed=0,
        )  # fmt: skip
        config = LTSConfig(quantize_attention_matmuls=matmuls)
        model = tiny_zoo_model("vit", num_labels=LABELS)
        trainer = LTSTrainer(model=model, args=args, lts_config=config, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.model

    uninterrupted = run().state_dict()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    resumed = run(str(checkpoint)).state_dict()
    assert uninterrupted.keys() == resumed.keys()
    assert sum(".matmul_quantizers." in k for k in uninterrupted) == (
        24 if matmuls else 0
    )  # 2 layers × 4 × 3
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    loaded = type(tiny_zoo_model("vit")).from_pretrained(checkpoint)
    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in loaded.state_dict().items())
