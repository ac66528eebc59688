"""LSQ quantizer math, the quantized layers and `prepare_model`, against float64 references."""

import math

import pytest
import torch
import torch.utils.cpp_extension
from helpers.tiny_models import tiny_mobilenet, tiny_resnet
from torch import nn
from torch.nn import functional as F

from hf_lts import LTSConfig, QuantConv2d, QuantLinear, prepare_model
from hf_lts.quantization import backend as backends
from hf_lts.quantization import layers as layer_module
from hf_lts.quantization import native, quantized_layers, state
from hf_lts.quantization.lsq import fake_quantize, lsq_forward, signed_range, unsigned_range


def lsq_reference(x, scale, qmin, qmax, grad_factor, grad_out):
    """Float64 LSQ: value, input gradient and step gradient (in-range test on the rounded value)."""
    x64, s64, g64 = x.double(), scale.double().view(-1, *([1] * (x.ndim - 1))), grad_out.double()
    v = x64 / s64
    r = torch.round(v)
    q = r.clamp(qmin, qmax)
    inside = (r >= qmin) & (r <= qmax)
    dq_ds = torch.where(inside, q - v, q)
    dims = tuple(range(x.ndim)) if scale.numel() == 1 else tuple(range(1, x.ndim))
    return q * s64, g64 * inside, (g64 * dq_ds).sum(dims).reshape(scale.shape) * grad_factor


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("signed", [True, False])
def test_fake_quantize_matches_float64_lsq(bits, per_channel, signed):
    torch.manual_seed(bits)
    x = torch.randn(6, 4, 3, 3) * 0.7
    if not signed:
        x = x.relu()
    qmin, qmax = signed_range(bits) if signed else unsigned_range(bits)
    scale = (torch.rand(6 if per_channel else 1) * 0.2 + 0.05).requires_grad_()
    xg = x.clone().requires_grad_()
    grad_factor = 1 / math.sqrt(x[0].numel() * qmax)
    out = fake_quantize(xg, scale, qmin, qmax, grad_factor)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_out, ref_dx, ref_ds = lsq_reference(x, scale.detach(), qmin, qmax, grad_factor, grad_out)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(xg.grad.double(), ref_dx, rtol=0, atol=0)
    torch.testing.assert_close(scale.grad.double(), ref_ds, rtol=1e-4, atol=1e-6)
    levels = (out.detach().double() / scale.detach().double().view(-1, 1, 1, 1)).round()
    assert levels.min() >= qmin and levels.max() <= qmax


def test_weight_quantizer_lsq_init_and_grad_factor():
    layer = QuantConv2d.from_float(nn.Conv2d(4, 6, 3), weight_bits=3, activation_bits=4, per_channel=True)
    qmax = 3
    expected = 2 * layer.weight.detach().abs().flatten(1).mean(1) / math.sqrt(qmax)
    torch.testing.assert_close(layer.weight_quantizer.scale.detach(), expected)
    assert layer.weight_quantizer.grad_factor == pytest.approx(1 / math.sqrt(4 * 9 * qmax))
    per_tensor = QuantLinear.from_float(nn.Linear(10, 3), weight_bits=2, activation_bits=2)
    assert per_tensor.weight_quantizer.scale.shape == (1,)
    assert per_tensor.weight_quantizer.grad_factor == pytest.approx(1 / math.sqrt(30 * 1))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("module", [nn.Conv2d(96, 160, 3), nn.Linear(700, 300)])
def test_initial_state_built_block_by_block_is_that_of_the_whole_weight(module, per_channel):
    """`_initial_state` computes the levels one block of output channels at a time (several blocks here);
    the state must be the one packed from the whole weight's levels."""
    layer = (QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear).from_float(
        module, 3, 4, per_channel
    )
    assert layer.weight[0].numel() * layer.weight.shape[0] > 2 * (1 << 16)  # more than one block
    levels, _ = layer.weight_quantizer.levels(layer.weight)
    expected = state.pack_trainable(levels, torch.full_like(levels, state.DISTANCE_ONE, dtype=torch.int32))
    assert torch.equal(layer.lts_state, expected)
    assert torch.equal(state.levels(layer.lts_state), levels.to(state.levels(layer.lts_state).dtype))


def test_activation_quantizer_sign_and_init_from_first_batch():
    layer = QuantLinear.from_float(nn.Linear(8, 4), weight_bits=4, activation_bits=4)
    x = torch.randn(16, 8).relu()
    layer(x)
    aq = layer.input_quantizer
    assert not bool(aq.signed) and (aq.qmin, aq.qmax) == (0, 15)
    torch.testing.assert_close(aq.scale.detach(), (2 * x.abs().mean() / math.sqrt(15)).reshape(1))
    first = aq.scale.detach().clone()
    layer(torch.randn(16, 8) * 10)  # later batches do not re-initialise
    torch.testing.assert_close(aq.scale.detach(), first)

    signed = QuantLinear.from_float(nn.Linear(8, 4), weight_bits=4, activation_bits=3)
    signed(torch.randn(16, 8))
    assert bool(signed.input_quantizer.signed) and (
        signed.input_quantizer.qmin,
        signed.input_quantizer.qmax,
    ) == (-4, 3)


def integer_reference(layer, x):
    """``(q_a · s_a) ⊛ (q_w · s_w)`` in float64 from the layer's own levels and steps."""
    aq, wq = layer.input_quantizer, layer.weight_quantizer
    s_a = aq.scale.detach().double()
    q_a = torch.round(x.double() / s_a).clamp(aq.qmin, aq.qmax)
    s_w = wq.scale.detach().double().view(-1, *([1] * (layer.weight.ndim - 1)))
    q_w = torch.round(layer.weight.detach().double() / s_w).clamp(wq.qmin, wq.qmax)
    q_w = torch.where(layer.frozen_mask, layer.weight_levels.double(), q_w)
    bias = None if layer.bias is None else layer.bias.detach().double()
    if isinstance(layer, QuantConv2d):
        return F.conv2d(q_a * s_a, q_w * s_w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(q_a * s_a, q_w * s_w, bias)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv2d(6, 8, 3, padding=1),
        lambda: nn.Conv2d(6, 6, 3, stride=2, groups=6, bias=False),  # depthwise
        lambda: nn.Conv2d(6, 4, 1, groups=2),
        lambda: nn.Linear(12, 5),
    ],
)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("frozen_fraction", [0.0, 0.5, 1.0])
def test_eval_output_is_the_integer_computation(make, per_channel, frozen_fraction):
    torch.manual_seed(1)
    layer = make()
    q = (QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear).from_float(layer, 3, 4, per_channel)
    x = torch.randn(4, 6, 9, 9) if isinstance(layer, nn.Conv2d) else torch.randn(4, 12)
    q.train()(x)  # initialise the input quantizer (signed: x has negative values)
    q.freeze_(torch.rand_like(q.weight) < frozen_fraction)
    with torch.no_grad():  # move the step after freezing: frozen weights must follow q·s
        q.weight_quantizer.scale.mul_(1.1)
    out = q.eval()(x)
    ref = integer_reference(q, x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_frozen_weights_have_no_gradient_and_fully_frozen_layers_skip_it():
    torch.manual_seed(2)
    q = QuantConv2d.from_float(nn.Conv2d(3, 4, 3), weight_bits=2, activation_bits=2)
    x = torch.randn(2, 3, 8, 8)
    mask = torch.rand_like(q.weight) < 0.5
    q.freeze_(mask)
    assert torch.equal(q.frozen_mask, mask) and q.num_frozen == int(mask.sum())
    q(x).square().sum().backward()
    assert torch.all(q.weight.grad[mask] == 0) and torch.any(q.weight.grad[~mask] != 0)
    assert q.weight_quantizer.scale.grad is not None

    q.zero_grad(set_to_none=True)
    q.freeze_(torch.ones_like(mask))
    q(x).square().sum().backward()
    assert q.weight.grad is None and q.weight_quantizer.scale.grad is None  # no weight-gradient work at all
    assert q.input_quantizer.scale.grad is not None


def test_freeze_snaps_latent_onto_level_and_is_permanent():
    torch.manual_seed(3)
    q = QuantLinear.from_float(nn.Linear(16, 8), weight_bits=4, activation_bits=4)
    levels_before = torch.round(q.weight.detach() / q.weight_quantizer.scale.detach()).clamp(-8, 7)
    mask = torch.zeros_like(q.weight, dtype=torch.bool)
    mask[:3] = True
    q.freeze_(mask)
    snapped = (levels_before * q.weight_quantizer.scale.detach()).to(torch.bfloat16).float()
    assert torch.equal(q.weight.detach()[mask], snapped[mask])
    assert torch.equal(q.weight_levels[mask].float(), levels_before[mask])
    q.freeze_(torch.zeros_like(mask))  # freezing nothing more keeps what is frozen
    assert torch.equal(q.frozen_mask, mask)


def test_prepare_resnet_replaces_every_layer_with_positional_bits():
    model = tiny_resnet()
    params = {n: p for n, p in model.named_parameters()}
    prepare_model(model, LTSConfig(weight_bits=2, activation_bits=3))
    layers = quantized_layers(model)
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    names = list(layers)
    assert names[0] == "resnet.embedder.embedder.convolution" and names[-1] == "classifier.1"
    assert layers[names[0]].weight_quantizer.bits == 8 and layers[names[0]].input_quantizer.bits == 8
    assert layers[names[-1]].weight_quantizer.bits == 8 and layers[names[-1]].input_quantizer.bits == 8
    for name in names[1:-1]:
        assert (layers[name].weight_quantizer.bits, layers[name].input_quantizer.bits) == (2, 3)
    for name, layer in layers.items():  # the original parameters are taken over, not copied
        assert layer.weight is params[f"{name}.weight"]
    assert model.config.quantization_config.weight_bits == 2 and model.lts_config.activation_bits == 3


def test_prepare_keeps_fp32_layers_and_excluded_modules():
    model = tiny_resnet()
    config = LTSConfig(first_layer_bits=None, last_layer_bits=None, modules_to_not_convert=["shortcut"])
    prepare_model(model, config)
    assert type(model.resnet.embedder.embedder.convolution) is nn.Conv2d
    assert type(model.classifier[1]) is nn.Linear
    shortcuts = [n for n, m in model.named_modules() if n.endswith("shortcut.convolution")]
    assert shortcuts and all(type(model.get_submodule(n)) is nn.Conv2d for n in shortcuts)
    assert len(quantized_layers(model)) > 0

    glob = tiny_resnet()
    prepare_model(glob, LTSConfig(modules_to_not_convert=["resnet.encoder.stages.1.*"]))
    assert all(not n.startswith("resnet.encoder.stages.1.") for n in quantized_layers(glob))


def test_prepare_mobilenet_handles_depthwise_and_signed_inputs():
    model = tiny_mobilenet()
    prepare_model(model, LTSConfig(weight_bits=4, activation_bits=4))
    layers = quantized_layers(model)
    assert len(layers) == sum(1 for m in tiny_mobilenet().modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert any(layer.groups > 1 for layer in layers.values() if isinstance(layer, QuantConv2d))
    model.train()(torch.randn(4, 3, 32, 32))
    signs = {n: bool(layer.input_quantizer.signed) for n, layer in layers.items()}
    assert any(signs.values()) and not all(signs.values())  # linear bottlenecks signed, post-ReLU6 unsigned
    assert all(int(layer.lts_macs) > 0 for layer in layers.values())


def test_prepare_is_idempotent_and_rejects_conflicts():
    model = tiny_resnet()
    config = LTSConfig()
    prepare_model(model, config)
    before = {n: id(m) for n, m in quantized_layers(model).items()}
    assert prepare_model(model, LTSConfig()) is model
    assert {n: id(m) for n, m in quantized_layers(model).items()} == before
    with pytest.raises(ValueError, match="already prepared with a different LTSConfig"):
        prepare_model(model, LTSConfig(weight_bits=2))


def test_prepare_rejects_models_without_layers():
    with pytest.raises(ValueError, match="no nn.Conv2d or nn.Linear"):
        prepare_model(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)), LTSConfig())
    with pytest.raises(ValueError, match="No layer .* would be quantized"):
        prepare_model(nn.Sequential(nn.Linear(3, 3)), LTSConfig(last_layer_bits=None))


def test_prepare_any_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    prepare_model(model, LTSConfig())
    assert isinstance(model[0], QuantConv2d) and isinstance(model[3], QuantLinear)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert model.lts_config == LTSConfig()


@pytest.mark.parametrize("per_channel", [False, True])
def test_partly_frozen_weight_follows_levels_and_only_trainable_weights_feed_the_step(per_channel):
    torch.manual_seed(4)
    q = QuantConv2d.from_float(nn.Conv2d(3, 4, 3), weight_bits=3, activation_bits=4, per_channel=per_channel)
    mask = torch.rand_like(q.weight) < 0.5
    q.freeze_(mask)
    with torch.no_grad():  # move the step after freezing: frozen weights must follow q·s
        q.weight_quantizer.scale.mul_(1.05)
    wq = q.weight_quantizer
    w_hat = q.quantized_weight()
    grad_out = torch.randn_like(w_hat)
    w_hat.backward(grad_out)
    ref_out, ref_dw, ref_ds = lsq_reference(
        q.weight.detach(), wq.scale.detach(), wq.qmin, wq.qmax, wq.grad_factor, grad_out.masked_fill(mask, 0)
    )
    s = wq.scale.detach().double().view(-1, 1, 1, 1)
    ref_out = torch.where(mask, q.weight_levels.double() * s, ref_out)
    torch.testing.assert_close(w_hat.detach().double(), ref_out, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(q.weight.grad.double(), ref_dw, rtol=0, atol=0)
    torch.testing.assert_close(wq.scale.grad.double(), ref_ds, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_fake_quantization_is_bit_identical_to_eager(per_channel):
    """The fused kernels (native on a CPU) give the eager passes' outputs and input gradients bit for bit,
    and their step gradients up to summation order."""
    torch.manual_seed(0)
    x = torch.randn(64, 32, 3, 3)
    scale = torch.rand(64 if per_channel else 1) * 0.1 + 0.02
    levels = torch.randint(-8, 8, x.shape, dtype=torch.int32)
    packed = levels * (1 << 24) + (torch.rand(x.shape) < 0.5).int() * (1 << 23)
    grad_out = torch.randn(x.shape)
    results = []
    for backend in ("eager", "native", "compiled"):
        xg, sg = x.clone().requires_grad_(), scale.clone().requires_grad_()
        out = fake_quantize(xg, sg, -8, 7, 0.01, packed, backend, weight=True)
        out.backward(grad_out)
        results.append((out.detach(), xg.grad, sg.grad))
    for other in results[1:]:
        for name, eager, fused in zip(("output", "input", "step_scale"), results[0], other, strict=True):
            _assert_same(name, fused, eager)


def _grads(layer, x, forward=None):
    """Output and every gradient of one forward/backward of ``layer`` on ``x`` (fixed output gradient)."""
    for p in layer.parameters():
        p.grad = None
    xg = x.detach().clone().requires_grad_(x.requires_grad)
    out = forward(layer, xg) if forward else layer(xg)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
    return {
        "output": out.detach(),
        "input": xg.grad,
        "weight": layer.weight.grad,
        "input_scale": layer.input_quantizer.scale.grad,
        "weight_scale": layer.weight_quantizer.scale.grad,
        "bias": None if layer.bias is None else layer.bias.grad,
    }


def _layer(kind, bits, per_channel, frozen):
    torch.manual_seed(bits)
    if kind == "conv":
        module, x = nn.Conv2d(8, 12, 3, padding=1, stride=2, bias=True), torch.randn(4, 8, 10, 10)
    elif kind == "depthwise":
        module, x = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), torch.randn(4, 8, 10, 10)
    elif kind == "grouped":  # no single-channel skipping: frozen channels still get (zero) gradients
        module, x = nn.Conv2d(8, 12, 3, padding=1, groups=2, bias=False), torch.randn(4, 8, 10, 10)
    else:
        module, x = nn.Linear(20, 12), torch.randn(6, 20)
    cls = QuantLinear if kind == "linear" else QuantConv2d
    layer = cls.from_float(module, bits, bits, per_channel=per_channel)
    if frozen == "random":
        layer.freeze_(torch.rand_like(layer.weight) < 0.5)
    elif frozen == "channels":  # whole channels (skipped weight gradients) and a partly frozen one
        mask = torch.zeros_like(layer.weight, dtype=torch.bool)
        mask[::3] = True
        mask[1] = torch.rand_like(layer.weight[1]) < 0.5
        layer.freeze_(mask)
    elif frozen == "all":
        layer.freeze_(torch.ones_like(layer.weight, dtype=torch.bool))
    return layer, x


#: Every bit width and input sign on the native backend; the GPU's backends (compiled, eager) at every bit
#: width with signed inputs and at 2 bits with unsigned ones (the suite's time).
_BACKEND_GRID = (
    [("native", bits, signed) for bits in (2, 3, 4, 8) for signed in (True, False)]
    + [(backend, bits, True) for backend in ("compiled", "eager") for bits in (2, 3, 4, 8)]
    + [(backend, 2, False) for backend in ("compiled", "eager")]
)


@pytest.mark.parametrize("kind", ["conv", "depthwise", "grouped", "linear"])
@pytest.mark.parametrize("backend, bits, signed", _BACKEND_GRID, indirect=["backend"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("frozen", ["none", "random", "channels", "all"])
def test_fused_layer_is_bit_identical_to_the_previous_implementation(
    backend, kind, bits, per_channel, signed, frozen
):
    """The fused layer (recomputed quantized input, channel-sliced weight gradients, step gradients reduced
    in the kernels) against the implementation before it (tests/helpers/lsq_reference.py): the same output, input,
    weight and bias gradients, bit for bit; the step gradients, sums, up to float summation order."""
    from helpers.lsq_reference import reference_forward

    layer, x = _layer(kind, bits, per_channel, frozen)
    x = (x if signed else x.relu()).requires_grad_()
    fused, reference = _grads(layer, x), _grads(layer, x, reference_forward)
    if frozen == "all":  # the reference computes the zeros the fused layer skips
        assert fused["weight"] is None and not reference["weight"].any()
        assert fused["weight_scale"] is None and not reference["weight_scale"].any()
        del fused["weight"], reference["weight"], fused["weight_scale"], reference["weight_scale"]
    for name, value in fused.items():
        if value is None:
            assert reference[name] is None, name
        else:
            _assert_same(name, value, reference[name])


def _assert_same(name, value, expected):
    """Bit for bit, except the step gradients: sums, whose order is the kernel's own."""
    if name.endswith("_scale"):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7, msg=name)
    else:
        assert torch.equal(value, expected), name


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_first_layer_input_step_gradient_by_the_adjoint_identity(kind):
    """Where the input needs no gradient (the pixels), the input step's gradient comes from one forward
    op instead of the transposed one: equal up to float summation order."""
    from helpers.lsq_reference import reference_forward

    layer, x = _layer(kind, 4, False, "random")
    fused, reference = _grads(layer, x), _grads(layer, x, reference_forward)
    assert fused["input"] is None and reference["input"] is None
    torch.testing.assert_close(fused["input_scale"], reference["input_scale"], rtol=1e-5, atol=1e-7)
    for name in ("output", "weight", "weight_scale"):
        _assert_same(name, fused[name], reference[name])


@pytest.mark.parametrize("frozen", ["random", "channels"])
def test_native_compiled_and_eager_layers_are_bit_identical(frozen):
    layer, x = _layer("conv", 4, True, frozen)
    results = []
    for backend in ("native", "compiled", "eager"):
        with backends.forced(backend):
            layer._refresh_cache()
            results.append(_grads(layer, x.relu().requires_grad_()))
    for other in results[1:]:
        for name, value in results[0].items():
            _assert_same(name, value, other[name])


@pytest.mark.native
def test_the_fused_kernels_are_the_native_ones_on_this_cpu():
    """Where a C++ compiler is (here, CI) the fused CPU kernels are the native ops: the bit-identity tests
    above compare them, not eager against eager."""
    assert native.ops() is not None
    with torch.profiler.profile() as prof:
        lsq_forward(torch.randn(64), torch.tensor([0.1]), -8, 7)
    assert "hf_lts::fake_quant" in {event.name for event in prof.events()}


@pytest.mark.parametrize("kind", ["conv", "depthwise", "grouped", "linear"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("frozen", ["none", "random", "channels", "all"])
@pytest.mark.parametrize("input_grad", [True, False])
def test_native_layer_node_is_bit_identical_to_the_python_function(
    monkeypatch, kind, per_channel, frozen, input_grad
):
    """On a CPU a layer's forward and backward run as one C++ autograd node (``hf_lts::quant_layer``); it
    computes what `QuantizedOp` computes, every output and gradient bit for bit (the first layer's pixels,
    which need no gradient, included)."""
    layer, x = _layer(kind, 4, per_channel, frozen)
    x = x.relu().requires_grad_(input_grad)
    with torch.profiler.profile() as prof:
        node = _grads(layer, x)
    assert "hf_lts::quant_layer" in {event.name for event in prof.events()}
    monkeypatch.setattr(layer_module, "native_layer_ops", lambda *args: None)
    function = _grads(layer, x)
    for name, value in node.items():
        assert value is None and function[name] is None or torch.equal(value, function[name]), name


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.Conv2d(8, 16, 3, padding=1), (4, 8, 9, 9)),
        (
            nn.Conv2d(8, 16, (3, 5), stride=(1, 2), padding=(0, 2), dilation=(2, 1), bias=False),
            (4, 8, 11, 11),
        ),
        (nn.Conv2d(3, 16, 7, stride=2, padding=3), (4, 3, 20, 20)),
        (nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), (4, 16, 9, 9)),
        (nn.Linear(32, 10), (3, 5, 32)),
    ],
)
@pytest.mark.parametrize("per_channel", [False, True])
def test_stragglers_gradient_is_computed_for_them_only(monkeypatch, module, shape, per_channel):
    """A layer of which only a few weights train computes their gradients only (one dot product each, no
    dense weight-gradient op): frozen weights get exact zeros, the rest and the steps' gradients equal the
    dense path's up to float summation order, everything else bit for bit."""
    torch.manual_seed(0)
    cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv2d
    layer = cls.from_float(module, 4, 4, per_channel=per_channel)
    layer.max_straggler_share, layer.straggler_costs = 0.2, (1.0, 0.0, 0.0)  # small layers: force the path
    x = torch.randn(shape).relu().requires_grad_()
    layer.input_quantizer.initialize_from(x)
    layer.freeze_(torch.rand_like(layer.weight) < 0.9)
    with torch.profiler.profile() as prof:
        stragglers = _grads(layer, x)
    assert layer._stragglers and layer.skipped_weight_grad_ratio == layer.num_frozen / layer.weight.numel()
    weight_backward = [e for e in prof.events() if e.name in ("aten::convolution_backward", "aten::mm")]
    # the input gradient's (and a convolution's bias gradient's) only
    assert len(weight_backward) == (1 if cls is QuantLinear else 1 + (layer.bias is not None))
    monkeypatch.setattr(layer_module, "native_layer_ops", lambda *args: None)
    dense = _grads(layer, x)
    assert not layer._stragglers
    assert not stragglers["weight"][layer.frozen_mask].any()
    for name, value in stragglers.items():
        if name in ("weight", "weight_scale"):
            torch.testing.assert_close(value, dense[name], rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert value is None and dense[name] is None or torch.equal(value, dense[name]), name


def test_a_failed_native_build_warns_and_runs_eagerly(monkeypatch):
    monkeypatch.setattr(native, "_loaded", None)  # as in a fresh process

    def no_compiler(**kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with backends.forced(None):  # the decisions made here are this process's: drop them afterwards
        with pytest.warns(UserWarning, match="could not build its CPU kernels.*no C\\+\\+ compiler found"):
            assert native.ops() is None
        assert native.ops() is None  # decided once
        assert backends.select(torch.device("cpu")) == "eager"
        layer, x = _layer("conv", 4, True, "channels")
        fused = _grads(layer, x.relu().requires_grad_())
    with backends.forced("eager"):
        eager = _grads(layer, x.relu().requires_grad_())
    for name, value in fused.items():
        assert value is None and eager[name] is None or torch.equal(value, eager[name]), name


@pytest.mark.parametrize("kind", ["conv", "depthwise", "linear"])
def test_frozen_channels_skip_their_weight_gradient_work(kind):
    """The backward computes weight gradients only for channels with a trainable weight: measured with
    FlopCounterMode, the weight-gradient FLOPs fall by the share of fully frozen channels."""
    from torch.utils.flop_counter import FlopCounterMode

    def backward_flops(layer, x):
        out = layer(x)
        with FlopCounterMode(display=False) as counter:
            out.backward(torch.ones_like(out))
        return counter.get_total_flops()

    layer, x = _layer(kind, 4, False, "none")
    x = x.relu().requires_grad_()
    full = backward_flops(layer, x)
    x_only = x.detach().requires_grad_()
    layer.freeze_(torch.ones_like(layer.weight, dtype=torch.bool))
    input_only = backward_flops(layer, x_only)  # every weight frozen: the input gradient alone
    assert layer.skipped_weight_grad_ratio == 1.0 and input_only < full

    layer, _ = _layer(kind, 4, False, "channels")  # a third of the channels entirely frozen
    skipped = layer.skipped_weight_grad_ratio
    assert skipped == pytest.approx(len(range(0, layer.weight.shape[0], 3)) / layer.weight.shape[0])
    partial = backward_flops(layer, x.detach().requires_grad_())
    weight_grad = full - input_only
    if kind == "depthwise":  # FlopCounterMode counts grouped convolutions by their number of groups
        assert input_only < partial < full
    else:
        assert partial == pytest.approx(input_only + (1 - skipped) * weight_grad, rel=1e-6)


def test_fully_frozen_layer_keeps_its_quantized_weight_until_step_or_state_change():
    """A fully frozen layer's ``q · s`` is made once and reused; writing its step (optimizer, in place) or
    its state (load_state_dict) makes it anew, always equal to the previous implementation's."""
    from helpers.lsq_reference import reference_forward

    layer, x = _layer("conv", 4, False, "all")
    x = x.relu()
    first = layer(x)
    held = layer._held[1]
    assert torch.equal(first, reference_forward(layer, x)) and torch.equal(layer(x), first)
    assert layer._held[1] is held  # reused, not recomputed
    with torch.no_grad():
        layer.weight_quantizer.scale.mul_(1.5)
    assert layer._held[1] is held and torch.equal(layer(x), reference_forward(layer, x))
    assert layer._held[1] is not held and not torch.equal(layer(x), first)
    before = layer(x)
    other = {k: v.clone() for k, v in layer.state_dict().items()}
    other["lts_state"] = other["lts_state"].flip(0)  # the same frozen levels, other channels
    layer.load_state_dict(other)
    after = layer(x)
    assert not torch.equal(after, before) and torch.equal(after, reference_forward(layer, x))
