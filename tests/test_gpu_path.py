"""The GPU's code path, run on the CPU: the compiled backend without host synchronisations or recompiles,
exact levels under autocast, channels-last layouts, moves between devices, held steps of frozen layers."""

import warnings

import pytest
import torch
from helpers.tiny_models import tiny_mobilenet, tiny_resnet
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import ResNetConfig, ResNetForImageClassification

from hf_lts import LotteryTicketScratcher, LTSConfig, QuantConv2d, QuantLinear, prepare_model
from hf_lts.quantization import backend as backends
from hf_lts.quantization import fused, lsq, quantized_layers
from hf_lts.quantization.kernel import compiled_kernels

#: Ops that make a host wait for the device: a read of a value, or a result whose size depends on values.
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "item", "is_nonzero", "equal", "unique", "masked_select"}


class SyncCounter(TorchDispatchMode):
    """Counts the ops in `SYNCING_OPS` that run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            self.count += 1
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def resnet18_layout(seed: int = 0) -> nn.Module:
    """ResNet-18's layout (21 quantized layers) at 1/8 width."""
    torch.manual_seed(seed)
    config = ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[8, 16, 32, 64], embedding_size=8, num_labels=5
    )
    return ResNetForImageClassification(config)


def batches(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(2, 3, size, size, generator=g), torch.randint(0, 5, (2,), generator=g)) for _ in range(n)
    ]


def step(model, optimizer, scratcher, x, y, dtype=torch.float32):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = model(pixel_values=x, labels=y).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scratcher.step()


@pytest.mark.parametrize("backend", ["compiled", "eager"])
def test_a_freezing_step_makes_no_host_synchronisation(backend):
    """A freezing-phase step of the ResNet-18 layout (channel completion, observed start; the setting whose
    old CPU-first path made 45 synchronisations a step) reads nothing back from the device: no scalar read,
    no value-dependent shape, in the layers or the scratcher."""
    config = LTSConfig(channel_completion=0.6, distance_init="observed", freeze_warmup_ratio=0.0)
    with backends.forced(backend):
        model = prepare_model(resnet18_layout(), config)
        assert len(quantized_layers(model)) == 21
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scratcher = LotteryTicketScratcher(model, total_steps=12)
        data = batches(8)
        for x, y in data[:2]:  # the first batch initialises the input steps (one read, once)
            step(model, optimizer, scratcher, x, y)
        counts = []
        for x, y in data[2:]:
            with SyncCounter() as counter:
                step(model, optimizer, scratcher, x, y)
            counts.append(counter.count)
        frozen = scratcher.stats()["frozen_ratio"]
    assert 0 < frozen < 1, "the steps counted must be freezing steps"
    assert max(counts) <= 1 and sum(counts) == 0, counts


def test_the_native_path_is_what_the_sync_counter_sees():
    """The counter is not blind: the native CPU path reads what froze back at once, every step."""
    config = LTSConfig(channel_completion=0.6, distance_init="observed", freeze_warmup_ratio=0.0)
    with backends.forced("native"):
        model = prepare_model(resnet18_layout(), config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scratcher = LotteryTicketScratcher(model, total_steps=12)
        data = batches(4)
        step(model, optimizer, scratcher, *data[0])
        with SyncCounter() as counter:
            scratcher.step()
    assert counter.count >= 1


def test_no_recompile_across_layer_shapes_bit_widths_batches_and_steps():
    """A compiled kernel serves every layer shape, bit width and batch: once the runs of ResNet-18's and
    MobileNetV2's layouts (bit widths 2–8, both granularities) have met every kernel variant (frozen or
    not, fully frozen layers, skipped channels), more steps at another batch size and resolution compile
    nothing, and nothing falls back to eager."""
    with backends.forced("compiled"), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*kernels failed")
        runs = []
        for make in (resnet18_layout, tiny_mobilenet):
            for bits, per_channel in ((2, False), (3, True), (4, False), (8, True)):
                config = LTSConfig(
                    weight_bits=bits, activation_bits=bits, per_channel=per_channel, freeze_warmup_ratio=0.0,
                    distance_momentum=0.5, distance_init="observed",
                    channel_completion=0.6 if bits == 4 else None,
                )  # fmt: skip
                model = prepare_model(make(), config)
                optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
                runs.append((model, optimizer, LotteryTicketScratcher(model, total_steps=8)))
        for model, optimizer, scratcher in runs:
            for x, y in batches(6, size=32):
                step(model, optimizer, scratcher, x, y)
            assert scratcher.stats()["frozen_ratio"] > 0
        compiled = compiled_kernels()
        g = torch.Generator().manual_seed(1)
        for model, optimizer, scratcher in runs:
            for _ in range(2):
                x, y = torch.randn(5, 3, 24, 24, generator=g), torch.randint(0, 5, (5,), generator=g)
                step(model, optimizer, scratcher, x, y)
        assert compiled_kernels() == compiled


@pytest.mark.parametrize("backend", ["compiled", "eager"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_autocast_convolves_the_exact_levels(backend, kind):
    """Under bf16 autocast a W8A8 layer convolves its integer levels (times a power of two: exact in
    bfloat16) and rescales in float32: the levels are the float32 layer's and the export's, and the output
    differs from the float32 layer's by the bf16 rounding of the product and of the output only, where
    rounding q·s to bfloat16 would lose neighbouring levels of 8-bit layers."""
    torch.manual_seed(0)
    if kind == "conv":
        module, x = nn.Conv2d(16, 24, 3, padding=1), torch.randn(4, 16, 8, 8).relu()
    else:
        module, x = nn.Linear(64, 24), torch.randn(6, 64).relu()
    layer = (QuantConv2d if kind == "conv" else QuantLinear).from_float(module, 8, 8, per_channel=True)
    with backends.forced(backend):
        layer._refresh_cache()
        layer.freeze_(torch.rand_like(layer.weight) < 0.3)
        reference = layer(x).detach()
        aq, wq = layer.input_quantizer, layer.weight_quantizer
        x_c, w_c, rx, rw, _ = fused.layer_levels(
            x, (aq.scale, aq.qmin, aq.qmax), layer.weight, (wq.scale, wq.qmin, wq.qmax), layer.lts_state,
            torch.bfloat16, backend,
        )  # fmt: skip
        x_levels, _ = lsq.quantize_levels(x, aq.scale, aq.qmin, aq.qmax)
        px = aq.scale.detach() / rx
        assert torch.equal(x_c.float() / px, x_levels)
        pw = (wq.scale.detach() / rw).view(-1, *[1] * (layer.weight.dim() - 1))
        assert torch.equal(
            (w_c.float() / pw).int(), layer.weight_levels
        )  # frozen levels held, the rest LSQ's
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
    product = reference - layer._channel_view(layer.bias.detach())  # the bias is added in float32, after
    error = (out.float() - reference).abs()
    assert (error <= 2**-8 * (product.abs() + reference.abs()) + 1e-6).all(), error.max()


def test_autocast_training_keeps_the_levels_of_the_float32_layers():
    """A bf16-autocast training run on the compiled backend freezes and holds weights like a float32 one:
    frozen weights' levels and latent values stay bit for bit, and the export codes are the state's levels."""
    from hf_lts.export.packed import export_state_dict, unpack_codes

    config = LTSConfig(weight_bits=4, activation_bits=4, freeze_warmup_ratio=0.0, distance_momentum=0.5)
    with backends.forced("compiled"):
        model = prepare_model(tiny_resnet(), config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        scratcher = LotteryTicketScratcher(model, total_steps=10)
        data = batches(10)
        step(model, optimizer, scratcher, *data[0], dtype=torch.bfloat16)
        layers = quantized_layers(model)
        held = {
            n: (m.frozen_mask, m.weight.detach().clone(), m.weight_levels.clone()) for n, m in layers.items()
        }
        for x, y in data[1:]:
            step(model, optimizer, scratcher, x, y, dtype=torch.bfloat16)
        assert scratcher.stats()["frozen_ratio"] > 0
        for name, layer in layers.items():
            mask, weight, levels = held[name]
            assert torch.equal(layer.weight.detach()[mask], weight[mask])
            assert torch.equal(layer.weight_levels[mask], levels[mask])
        tensors, _ = export_state_dict(model)
        for name, layer in layers.items():  # the levels the last bf16 forward convolved are the export's
            wq = layer.weight_quantizer
            levels = fused.layer_levels(
                torch.ones(1, 1), (layer.input_quantizer.scale, 0, 1), layer.weight, (wq.scale, wq.qmin, wq.qmax),
                layer.lts_state, torch.bfloat16, "compiled",
            )  # fmt: skip
            pw = (wq.scale.detach() / levels[3]).view(-1, *[1] * (layer.weight.dim() - 1))
            codes = unpack_codes(tensors[f"{name}.weight"], wq.bits)[: layer.weight.numel()]
            assert torch.equal((levels[1].float() / pw).int().view(-1) - wq.qmin, codes), name


@pytest.mark.parametrize("backend", ["native", "compiled"])
def test_channels_last_models_train_without_converting_the_state(backend):
    """``model.to(memory_format=torch.channels_last)`` leaves the LTS state and latent weights in the default
    layout; channels-last activations reach the kernels as views; training matches the default layout's."""
    config = LTSConfig(freeze_warmup_ratio=0.0, distance_momentum=0.5, channel_completion=0.6)
    data = batches(5, size=16)
    results = []
    with backends.forced(backend):
        for layout in (torch.contiguous_format, torch.channels_last):
            model = prepare_model(tiny_resnet(), config).to(memory_format=layout)
            for layer in quantized_layers(model).values():
                assert layer.lts_state.is_contiguous() and layer.weight.is_contiguous()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
            scratcher = LotteryTicketScratcher(model, total_steps=5)
            for x, y in data:
                step(model, optimizer, scratcher, x.to(memory_format=layout), y)
            results.append({k: v.float() for k, v in model.state_dict().items()})
    x = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
    assert fused._rows(x, False).data_ptr() == x.data_ptr()  # a view: no copy of the activation
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-4, atol=1e-5, msg=key)


def test_moving_a_frozen_or_loaded_model_moves_what_its_layers_keep():
    """Freezing (or loading) on one device and moving to another: the active channels follow (here to the
    meta device, the one other device a CPU has)."""
    layer = QuantConv2d.from_float(nn.Conv2d(8, 16, 3), 4, 4)
    layer.min_skipped_share_device = layer.min_skipped_share  # (skip single channels on every backend)
    mask = torch.zeros_like(layer.weight, dtype=torch.bool)
    mask[:12] = True
    layer.freeze_(mask)
    assert layer._active_channels is not None and layer._active_channels.device.type == "cpu"
    layer.to("meta")
    assert layer._active_channels.device.type == "meta" and layer.lts_state.device.type == "meta"
    assert layer._held is None


@pytest.mark.parametrize("backend", ["native", "compiled", "eager"])
def test_a_fully_frozen_layer_keeps_its_step_under_zero_gradients(backend):
    """Under DDP a fully frozen layer gets zero gradients (one process: none); momentum would still move
    its step. The scratcher holds it, so DDP computes what one process does."""
    config = LTSConfig(freeze_warmup_ratio=0.0)
    with backends.forced(backend):
        model = prepare_model(tiny_resnet(), config)
        layers = list(quantized_layers(model).values())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scratcher = LotteryTicketScratcher(model, total_steps=10)
        for p in model.parameters():  # momentum from an earlier step
            p.grad = torch.ones_like(p)
        optimizer.step()
        scratcher.step()
        full = layers[0]
        full.freeze_(torch.ones_like(full.weight, dtype=torch.bool))
        scale, weight = full.weight_quantizer.scale.detach().clone(), full.weight.detach().clone()
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.zeros_like(p)  # what DDP hands every parameter
            optimizer.step()
            scratcher.step()
            assert torch.equal(full.weight_quantizer.scale.detach(), scale)
            assert torch.equal(full.weight.detach(), weight)
