"""``LTSConfig(quantize_attention_matmuls=True)``: the inputs of Q·Kᵀ and P·V fake-quantized on ViT and DeiT,
trained by `LTSTrainer`, reloaded exactly by ``from_pretrained``, exported to ONNX as Q/DQ in both forms."""

from __future__ import annotations

import onnx
import pytest
import torch
from helpers.tiny_zoo import image_size, tiny_zoo_model
from test_onnx import check_agreement
from test_zoo import LABELS, train_with_trainer
from torch import nn
from torch.overrides import TorchFunctionMode

from hf_lts import LTSConfig, export_onnx, prepare_model
from hf_lts.quantization import quantized_layers
from hf_lts.quantization.attention import ATTENTION_IMPLEMENTATION, MATMUL_INPUTS, matmul_quantizers
from hf_lts.quantization.lsq import ActivationFakeQuantizer

CONFIG = LTSConfig(weight_bits=4, activation_bits=3, quantize_attention_matmuls=True)


class _MatmulInputs(TorchFunctionMode):
    """Records the operands of every ``torch.matmul`` (the attention matmuls: Linear layers call F.linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.matmul:
            self.calls.append((args[0].detach(), args[1].detach()))
        return func(*args, **(kwargs or {}))


def _quantizer_states(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.clone()
        for name, module in matmul_quantizers(model).items()
        for key, value in module.state_dict().items()
    }


@pytest.mark.parametrize("arch", ["vit", "deit"])
def test_matmul_inputs_are_on_the_level_grid(arch):
    model = tiny_zoo_model(arch, num_labels=LABELS)
    with torch.no_grad():  # peaked attention, as in a trained model (a fresh one's is nearly uniform)
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "k_proj")):
                module.weight.mul_(30)
    prepare_model(model, CONFIG)
    quantizers = list(matmul_quantizers(model).values())
    assert len(quantizers) == model.config.num_hidden_layers
    pixels = torch.randn(4, 3, 32, 32)
    model.train()
    model(pixel_values=pixels)  # the first batch initialises the quantizers
    model.eval()
    with _MatmulInputs() as recorded, torch.no_grad():
        model(pixel_values=pixels)
    assert len(recorded.calls) == 2 * len(quantizers)
    for i, module in enumerate(quantizers):
        q_k, p_v = recorded.calls[2 * i : 2 * i + 2]
        operands = {"query": q_k[0], "key": q_k[1], "probs": p_v[0], "value": p_v[1]}
        for name in MATMUL_INPUTS:
            quantizer = getattr(module, name)
            assert quantizer.bits == CONFIG.activation_bits
            assert bool(quantizer.signed) == (name != "probs")  # probabilities are non-negative
            levels = operands[name] / quantizer.scale
            assert torch.allclose(levels, levels.round(), atol=1e-4), name
            assert levels.min() >= quantizer.qmin - 1e-4 and levels.max() <= quantizer.qmax + 1e-4, name
            assert len(levels.round().unique()) > 2, name  # the grid, not a collapsed tensor


@pytest.mark.parametrize("arch", ["vit", "deit"])
def test_trained_reloaded_exactly_and_exported(arch, tmp_path):
    model = tiny_zoo_model(arch, num_labels=LABELS)
    prepare_model(model, CONFIG)
    model.train()
    model(pixel_values=torch.randn(4, 3, 32, 32))  # initialise, to see the steps move in training
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".matmul_quantizers." in n}
    assert len(before) == 4 * model.config.num_hidden_layers
    pixels = train_with_trainer(model, CONFIG, tmp_path)
    model.eval()
    trained = dict(model.named_parameters())
    assert all(not torch.equal(trained[n], value) for n, value in before.items())  # steps are trained

    reloaded = type(model).from_pretrained(tmp_path / "export")
    assert reloaded.config._attn_implementation == ATTENTION_IMPLEMENTATION
    assert set(quantized_layers(reloaded)) == set(quantized_layers(model))
    expected, got = _quantizer_states(model), _quantizer_states(reloaded)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    for module in matmul_quantizers(reloaded).values():  # flags re-read from the loaded buffers
        assert all(q._initialized and q.qmin == (-4 if bool(q.signed) else 0) for q in module.children())
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)

    for weight_type in ("int8", "native") if arch == "vit" else ("int8",):
        path = export_onnx(
            model, tmp_path / weight_type, pixels[:2], weight_type=weight_type, dynamic_size=False
        )
        check_agreement(model, path, pixels)
        check_attention_matmuls_dequantized(onnx.load(path).graph, model.config.num_hidden_layers)


def check_attention_matmuls_dequantized(graph, layers: int) -> None:
    """Two attention MatMuls per layer (those whose second operand is no weight), each operand coming
    from a DequantizeLinear (through the Transpose of Kᵀ)."""
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}

    def dequantized(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type == "Transpose":
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    attention = [
        n for n in graph.node if n.op_type == "MatMul" and not _weight_operand(n.input[1], producer, inits)
    ]
    assert len(attention) == 2 * layers
    assert all(dequantized(name) for n in attention for name in n.input)


def _weight_operand(name: str, producer: dict, inits: set[str]) -> bool:
    """Whether ``name`` is a Linear layer's weight: an initializer, or computed from initializers only."""
    if name in inits:
        return True
    node = producer.get(name)
    return node is not None and all(_weight_operand(i, producer, inits) for i in node.input if i)


def test_default_is_off_and_the_option_round_trips():
    assert LTSConfig().quantize_attention_matmuls is False
    model = prepare_model(tiny_zoo_model("vit", num_labels=LABELS), LTSConfig())
    assert not matmul_quantizers(model) and model.config._attn_implementation != ATTENTION_IMPLEMENTATION
    assert LTSConfig.from_dict(CONFIG.to_dict()).quantize_attention_matmuls is True
    with pytest.raises(ValueError, match="quantize_attention_matmuls"):
        LTSConfig(quantize_attention_matmuls="yes")


@pytest.mark.parametrize("arch", ["deit_distilled", "beit", "dinov2", "swin"])
def test_the_other_attention_interface_models_reload_exactly(arch, tmp_path):
    model = prepare_model(tiny_zoo_model(arch, num_labels=LABELS), CONFIG)
    assert len(matmul_quantizers(model)) == 2
    size = image_size(model)
    pixels = torch.randn(4, 3, size, size)
    model.train()
    model(pixel_values=pixels)
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert _quantizer_states(reloaded).keys() == _quantizer_states(model).keys()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


#: Their attention is their own code (LeViT, PVTv2, MobileViT, Swin V2's cosine attention), or they have none.
@pytest.mark.parametrize("arch", ["levit", "pvt_v2", "mobilevit", "swinv2", "resnet", "plain"])
def test_attention_that_cannot_be_routed_is_refused_before_anything_changes(arch):
    if arch == "plain":
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    else:
        model = tiny_zoo_model(arch, num_labels=LABELS)
    with pytest.raises(ValueError, match="quantize_attention_matmuls=False"):
        prepare_model(model, CONFIG)
    assert not quantized_layers(model)
    assert not any(isinstance(m, ActivationFakeQuantizer) for m in model.modules())
