"""The scratcher against sequences computed by hand (LTS.md §2–5), exactness and state round trips."""

import copy
import math

import pytest
import torch
from helpers.tiny_models import tiny_mobilenet, tiny_resnet
from torch import nn

from hf_lts import LotteryTicketScratcher, LTSConfig, prepare_model
from hf_lts.quantization import backend as backends
from hf_lts.quantization import quantized_layers, state
from hf_lts.scratcher import freeze_threshold, warmup_steps

RES = 1 / state.DISTANCE_ONE


def single_layer(values, **config):
    """A one-layer model whose 4-bit weights sit at ``values`` steps (the step is fixed at 1)."""
    model = nn.Sequential(nn.Linear(len(values), 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([values]))
    prepare_model(model, LTSConfig(last_layer_bits=4, **config))
    layer = model[0]
    with torch.no_grad():
        layer.weight_quantizer.scale.fill_(1.0)
        layer.lts_state.copy_(state.initial_state(torch.round(layer.weight).clamp(-8, 7)))
    return model, layer


def reference_run(v0, steps, m, total, warmup_ratio, r_of_t):
    """Float64 LTS (§2–3) over the weight values ``steps`` (one row per optimizer step)."""
    prev = [min(7, max(-8, round(v))) for v in v0]
    d = [1.0] * len(v0)
    frozen = [False] * len(v0)
    t_w = round(warmup_ratio * total)
    history = []
    for t, values in enumerate(steps, start=1):
        for i, v in enumerate(values):
            if frozen[i]:
                continue
            q = min(7, max(-8, round(v)))
            d[i] = 1.0 if q != prev[i] else m * d[i] + (1 - m) * abs(v - q)
            prev[i] = q
            if t > t_w and d[i] <= r_of_t(t):
                frozen[i] = True
        history.append((list(d), list(frozen)))
    return history


def test_threshold_schedules():
    config = LTSConfig(freeze_warmup_ratio=0.2)
    assert warmup_steps(config, 100) == 20
    assert freeze_threshold(config, 20, 100) is None
    assert freeze_threshold(config, 21, 100) == pytest.approx(1 / 80)
    assert freeze_threshold(config, 60, 100) == pytest.approx(0.5)
    assert freeze_threshold(config, 100, 100) == pytest.approx(1.0)
    assert freeze_threshold(config, 150, 100) == pytest.approx(1.0)  # runs longer than planned stay at p = 1
    sine = LTSConfig(freeze_schedule="sine")
    assert freeze_threshold(sine, 60, 100) == pytest.approx(math.sin(math.pi / 4))
    constant = LTSConfig(freeze_schedule="constant", freeze_threshold=0.07)
    assert freeze_threshold(constant, 21, 100) == 0.07 and freeze_threshold(constant, 99, 100) == 0.07


def test_ema_reset_and_freezing_follow_the_hand_computed_sequence():
    v0 = [0.30, 1.20, -2.45, 0.00, 3.49]
    steps = [
        [0.31, 1.18, -2.40, 0.02, 3.40],
        [0.28, 1.22, -2.55, 0.01, 3.45],  # -2.55 rounds to -3: a transition, the distance restarts at 1
        [0.30, 1.10, -2.60, 0.00, 3.52],  # 3.52 rounds to 4: a transition
        [0.29, 1.05, -2.72, 0.01, 3.60],
        [0.30, 1.02, -2.80, 0.00, 3.70],
        [0.30, 1.01, -2.90, 0.00, 3.90],
    ]
    m, total = 0.5, 6
    model, layer = single_layer(v0, distance_momentum=m, freeze_warmup_ratio=0.34, freeze_schedule="linear")
    scratcher = LotteryTicketScratcher(model, total_steps=total)
    ref = reference_run(v0, steps, m, total, 0.34, lambda t: freeze_threshold(model.lts_config, t, total))
    assert warmup_steps(model.lts_config, total) == 2
    frozen_latent = {}
    for t, (values, (d_ref, frozen_ref)) in enumerate(zip(steps, ref, strict=True), start=1):
        with torch.no_grad():  # what an optimizer would do; frozen weights must come back
            layer.weight.copy_(torch.tensor([values]))
        scratcher.step()
        mask = layer.frozen_mask[0].tolist()
        assert mask == frozen_ref, f"step {t}"
        d = state.distance(layer.lts_state)[0]
        for i, (is_frozen, d_i) in enumerate(zip(mask, d_ref, strict=True)):
            if not is_frozen:
                assert abs(float(d[i]) - d_i) <= 2 * RES, f"step {t}, weight {i}"
            elif i not in frozen_latent:
                frozen_latent[i] = (layer.weight[0, i].item(), int(layer.weight_levels[0, i]))
            else:  # permanent, level and latent value held exactly
                assert (layer.weight[0, i].item(), int(layer.weight_levels[0, i])) == frozen_latent[i]
    assert frozen_latent, "the sequence is meant to freeze something"
    assert scratcher.step_count == len(steps)


def test_warmup_boundary_with_constant_threshold():
    model, layer = single_layer(
        [0.1, 0.45], distance_momentum=0.0, freeze_schedule="constant", freeze_threshold=0.2
    )
    scratcher = LotteryTicketScratcher(model, total_steps=10)  # t_w = 2
    for t in (1, 2):
        scratcher.step()
        assert layer.num_frozen == 0, f"nothing may freeze during warm-up (t={t})"
    scratcher.step()
    assert layer.frozen_mask[0].tolist() == [True, False]  # d = 0.1 ≤ 0.2 < 0.45


def test_no_freezing_when_disabled():
    model, layer = single_layer([0.0, 0.01], freeze=False, freeze_warmup_ratio=0.0)
    scratcher = LotteryTicketScratcher(model, total_steps=4)
    initial = layer.lts_state.clone()
    for _ in range(4):
        scratcher.step()
    assert layer.num_frozen == 0 and torch.equal(layer.lts_state, initial)
    stats = scratcher.stats()
    assert stats["step"] == 4 and stats["frozen_ratio"] == 0 and stats["weight_updates_saved"] == 0


def test_ema_tracks_float64_at_momentum_0_9999():
    """LTS.md §4's precision trap: at m = 0.9999 each update moves d by ~1e-4, below fp16's resolution."""
    n, updates, m = 256, 20_000, 0.9999
    torch.manual_seed(0)
    levels = torch.randint(-6, 6, (n,)).double()
    offsets = torch.rand(n, dtype=torch.float64) * 0.8 - 0.4  # each weight's typical distance
    model, layer = single_layer(levels.tolist(), distance_momentum=m, freeze_warmup_ratio=0.5)
    scratcher = LotteryTicketScratcher(model, total_steps=10 * updates)  # no freezing in this window
    ref = torch.ones(n, dtype=torch.float64)
    half = torch.ones(n, dtype=torch.float16)  # what a 2-byte float EMA would do
    generator = torch.Generator().manual_seed(1)
    for _ in range(updates):
        jitter = (torch.rand(n, generator=generator, dtype=torch.float64) - 0.5) * 0.1
        v = levels + offsets + jitter
        d_now = (v - levels).abs()
        with torch.no_grad():
            layer.weight.copy_(v.float().view(1, -1))
        scratcher.step()
        ref = m * ref + (1 - m) * d_now
        half = (m * half.float() + (1 - m) * d_now.float()).half()
    error = (state.distance(layer.lts_state)[0].double() - ref).abs()
    assert error.mean() <= 1e-3 and error.max() <= 5e-3
    assert (half.double() - ref).abs().mean() > 0.1  # the fp16 EMA never moved from 1
    assert layer.num_frozen == 0


def train(model, optimizer, scratcher, batches, check_frozen_grads=False):
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(pixel_values=x).logits, y)
        loss.backward()
        if check_frozen_grads:
            for layer in quantized_layers(model).values():
                if layer.weight.grad is not None:
                    assert torch.all(layer.weight.grad[layer.frozen_mask] == 0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scratcher.step()


def batches(n, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, size, size, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)
    ]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    ],
    ids=["sgd-momentum-wd", "adamw"],
)
def test_frozen_weights_bit_exact_under_any_optimizer(backend, make_optimizer):
    config = LTSConfig(
        weight_bits=2,
        distance_momentum=0.5,
        freeze_schedule="constant",
        freeze_threshold=0.3,
        freeze_warmup_ratio=0.05,
    )
    model = prepare_model(tiny_resnet(), config)
    optimizer = make_optimizer(model.parameters())
    scratcher = LotteryTicketScratcher(model, total_steps=60)
    layers = quantized_layers(model)
    held = {n: (layer.weight.detach().clone(), layer.weight_levels.clone()) for n, layer in layers.items()}
    was_frozen = {n: torch.zeros_like(layer.frozen_mask) for n, layer in layers.items()}
    frozen_by_step_10 = 0
    for t, batch in enumerate(batches(60), start=1):
        train(model, optimizer, scratcher, [batch], check_frozen_grads=True)
        for name, layer in layers.items():
            mask, old = layer.frozen_mask, was_frozen[name]
            assert torch.all(mask[old]), "freezing is permanent"
            weight, levels = held[name]
            assert torch.equal(layer.weight.detach()[old], weight[old]), (name, t)
            assert torch.equal(layer.weight_levels[old], levels[old]), (name, t)
            new = mask & ~old
            weight[new], levels[new] = layer.weight.detach()[new], layer.weight_levels[new]
            was_frozen[name] = mask
        if t == 10:
            frozen_by_step_10 = sum(int(m.sum()) for m in was_frozen.values())
    assert frozen_by_step_10 > 100, "enough weights must freeze early to be held for ≥ 50 steps"
    assert scratcher.stats()["frozen_ratio"] > 0.25


@pytest.mark.parametrize(
    "per_channel, distance_init, completion",
    [(False, "one", None), (True, "one", 0.6), (False, "observed", 0.6), (True, "observed", None)],
)
def test_the_update_is_bit_identical_on_every_backend(per_channel, distance_init, completion):
    """The native update (one call for every layer, read by the host at once), and the compiled and eager
    ones (one kernel per layer, nothing read back until the next step) are the same computation: from the
    same weights, moved the same way every step, the same bits in every weight, step, state and counter
    (but the realised-saving counter, which the device path advances one step late)."""
    config = LTSConfig(
        weight_bits=3, distance_momentum=0.8, freeze_warmup_ratio=0.1, per_channel=per_channel,
        distance_init=distance_init, channel_completion=completion,
    )  # fmt: skip
    runs = []
    for backend in ("native", "compiled", "eager"):
        with backends.forced(backend):
            torch.manual_seed(0)
            model = prepare_model(tiny_resnet(), config)
            scratcher = LotteryTicketScratcher(model, total_steps=12)
            g = torch.Generator().manual_seed(1)
            with torch.profiler.profile() as prof:
                for _ in range(12):
                    with torch.no_grad():  # an "optimizer" that moves every parameter, frozen or not
                        for p in model.parameters():
                            p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.detach().abs().mean())
                    scratcher.step()
            native_calls = sum(event.name == "hf_lts::update_layers" for event in prof.events())
            assert native_calls == (12 if backend == "native" else 0)
            stats = scratcher.stats()
            del stats["backward_flops_saved_realised"]
            for layer in stats["per_layer"].values():
                del layer["skipped_weight_grad_ratio"]
            runs.append((model.state_dict(), stats))
    (native_state, native_stats), *others = runs
    assert 0 < native_stats["frozen_ratio"] < 1
    for other_state, other_stats in others:
        assert other_stats == native_stats
        for key in native_state:
            if not key.endswith("lts_skipped_steps"):
                assert torch.equal(native_state[key], other_state[key]), key


def test_state_dict_round_trip_mid_schedule_continues_identically(backend):
    config = LTSConfig(weight_bits=3, activation_bits=3, distance_momentum=0.9, freeze_warmup_ratio=0.1)
    data = batches(12, seed=3, size=8)

    def fresh():
        model = prepare_model(tiny_mobilenet(), config)
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)

    straight, opt = fresh()
    scratcher = LotteryTicketScratcher(straight, total_steps=12)
    train(straight, opt, scratcher, data[:6])
    straight.state_dict()  # the checkpoint the uninterrupted run writes at step 6
    train(straight, opt, scratcher, data[6:])

    first, opt = fresh()
    train(first, opt, LotteryTicketScratcher(first, total_steps=12), data[:6])
    model_state = {k: v.clone() for k, v in first.state_dict().items()}
    opt_state, rng_state = opt.state_dict(), torch.get_rng_state()  # dropout draws from the global RNG
    resumed, opt = fresh()
    resumed.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    torch.set_rng_state(rng_state)
    scratcher = LotteryTicketScratcher(resumed, total_steps=12)
    assert scratcher.step_count == 6
    train(resumed, opt, scratcher, data[6:])

    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert scratcher.stats()["frozen_ratio"] > 0


def test_stats_follow_the_definitions():
    config = LTSConfig(distance_momentum=0.5, freeze_schedule="constant", freeze_threshold=0.3)
    model = prepare_model(tiny_resnet(), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scratcher = LotteryTicketScratcher(model, total_steps=8)
    layers = quantized_layers(model)
    frozen_per_step = []
    for x, y in batches(8, size=16):
        train(model, optimizer, scratcher, [(x, y)])
        frozen_per_step.append({n: layer.num_frozen for n, layer in layers.items()})
    stats = scratcher.stats()
    numel = {n: layer.weight.numel() for n, layer in layers.items()}
    total = sum(numel.values())
    assert stats["step"] == 8 and stats["quantized_weights"] == total
    assert stats["frozen_ratio"] == pytest.approx(sum(frozen_per_step[-1].values()) / total)
    updates = sum(sum(f.values()) for f in frozen_per_step) / (8 * total)
    assert stats["weight_updates_saved"] == pytest.approx(updates)
    assert 0 < stats["weight_updates_saved"] < 1

    stem = layers["resnet.embedder.embedder.convolution"]  # 3→8, 7×7, stride 2 on 16×16: 8×8 outputs
    assert int(stem.lts_macs) == 8 * 8 * 8 * 3 * 7 * 7
    macs = {n: int(layer.lts_macs) for n, layer in layers.items()}
    flops = sum(sum(f[n] for f in frozen_per_step) / (8 * numel[n]) * macs[n] for n in layers) / (
        2 * sum(macs.values())
    )
    assert stats["backward_flops_saved"] == pytest.approx(flops)
    assert stats["backward_flops_saved"] <= stats["weight_updates_saved"]
    assert stats["state_bytes_per_weight"] == 4.0
    assert 0 <= stats["backward_flops_saved_realised"] <= stats["backward_flops_saved"]
    assert stats["per_layer"]["classifier.1"] == {
        "frozen_ratio": frozen_per_step[-1]["classifier.1"] / numel["classifier.1"],
        "skipped_weight_grad_ratio": layers["classifier.1"].skipped_weight_grad_ratio,
        "weight_bits": 8,
        "activation_bits": 8,
        "numel": numel["classifier.1"],
    }


def test_scratcher_rejects_bad_input():
    with pytest.raises(ValueError, match="prepare_model"):
        LotteryTicketScratcher(tiny_resnet(), LTSConfig(), total_steps=10)
    with pytest.raises(ValueError, match="prepare_model"):
        LotteryTicketScratcher(nn.Linear(2, 2), total_steps=10)
    model = prepare_model(tiny_resnet(), LTSConfig())
    with pytest.raises(ValueError, match="total_steps=0"):
        LotteryTicketScratcher(model, total_steps=0)


def test_realised_saving_counts_the_skipped_channel_work():
    """Whole frozen channels are skipped work; scattered frozen weights are counted but not realised."""
    model = prepare_model(tiny_resnet(), LTSConfig(freeze_warmup_ratio=0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scratcher = LotteryTicketScratcher(model, total_steps=100)
    layers = quantized_layers(model)
    train(model, optimizer, scratcher, batches(1, size=16))  # lts_macs from the first batch
    for layer in layers.values():  # half the channels whole, and a scattered tenth of the rest
        mask = torch.rand_like(layer.weight) < 0.1
        mask[: layer.weight.shape[0] // 2] = True
        layer.freeze_(mask)
    skipped = {n: layer.skipped_weight_grad_ratio for n, layer in layers.items()}
    train(model, optimizer, scratcher, batches(3, size=16))
    stats = scratcher.stats()
    macs = {n: int(layer.lts_macs) for n, layer in layers.items()}
    expected = sum(3 * skipped[n] * macs[n] for n in layers) / (2 * sum(macs.values()) * 4)
    assert stats["backward_flops_saved_realised"] == pytest.approx(expected)
    assert 0 < stats["backward_flops_saved_realised"] < stats["backward_flops_saved"]


@pytest.mark.parametrize("share", [0.5, 0.9])
def test_channel_completion_freezes_the_rest_of_a_mostly_frozen_channel(share):
    model, layer = single_layer(
        [0.02, 0.03, 0.01, 0.45, 2.0, 1.01, 0.48, 3.3],
        distance_momentum=0.0,
        freeze_schedule="constant",
        freeze_threshold=0.05,
        freeze_warmup_ratio=0.0,
        channel_completion=share,
    )
    scratcher = LotteryTicketScratcher(model, total_steps=10)
    before = layer.weight.detach().clone()
    scratcher.step()  # 0.02, 0.03, 0.01, 2.0 and 1.01 (d = 0.01) freeze: 5 of 8 ≥ 0.5, < 0.9
    completed = share <= 5 / 8
    assert layer.num_frozen == (8 if completed else 5)
    assert layer.skipped_weight_grad_ratio == (1.0 if completed else 0.0)
    # completed weights are frozen at their current level, snapped onto it
    levels = torch.round(before).clamp(-8, 7)
    assert torch.equal(layer.weight_levels[0].float(), levels[0])
    frozen = layer.frozen_mask[0]
    assert torch.equal(layer.weight.detach()[0][frozen], levels[0][frozen])


@pytest.mark.parametrize("per_channel", [False, True])
def test_completing_channels_equals_freezing_them_whole(per_channel):
    """Completion freezes the chosen channels only (`_freeze_at` with ``rows``): the same state and latent
    weights, bit for bit, as freezing every trainable weight of those channels through the whole tensor."""
    torch.manual_seed(0)
    config = LTSConfig(per_channel=per_channel, distance_momentum=0.5, freeze_warmup_ratio=0.0)
    model = prepare_model(tiny_resnet(), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, optimizer, LotteryTicketScratcher(model, total_steps=30), batches(4, size=16))
    for layer in quantized_layers(model).values():
        rows = torch.tensor([0, layer.weight.shape[0] - 1])
        twin = copy.deepcopy(layer)
        select = torch.zeros(layer.weight.shape[0], dtype=torch.bool).index_fill(0, rows, True)
        mask = select.view(-1, *[1] * (layer.weight.ndim - 1)) & ~twin.frozen_mask
        with torch.no_grad():
            twin._freeze_at(mask, twin.weight_levels)
            part = layer.lts_state.index_select(0, rows)
            layer._freeze_at(~state.frozen(part), state.levels(part), rows)
        assert torch.equal(layer.lts_state, twin.lts_state) and layer.num_frozen == twin.num_frozen
        assert torch.equal(layer.weight.detach(), twin.weight.detach())
        assert state.frozen(layer.lts_state)[rows].all()


def test_observed_distance_init_starts_from_the_first_observation():
    values = [0.3, 1.2, -2.45, 0.0]
    paper, paper_layer = single_layer(values, distance_momentum=0.99)
    observed, observed_layer = single_layer(values, distance_momentum=0.99, distance_init="observed")
    for model in (paper, observed):
        LotteryTicketScratcher(model, total_steps=10).step()
    assert torch.allclose(
        state.distance(paper_layer.lts_state)[0],
        torch.tensor([1 - 0.01 * (1 - d) for d in (0.3, 0.2, 0.45, 0.0)]),
        atol=2 * RES,
    )
    # "observed": the EMA takes the first distance it sees, then moves at 1 - m as usual
    assert torch.allclose(
        state.distance(observed_layer.lts_state)[0], torch.tensor([0.3, 0.2, 0.45, 0.0]), atol=2 * RES
    )


def test_observed_distance_init_freezes_earlier_in_a_short_run():
    def frozen_after(distance_init):
        torch.manual_seed(0)
        config = LTSConfig(distance_init=distance_init, freeze_warmup_ratio=0.2)
        model = prepare_model(tiny_resnet(), config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
        scratcher = LotteryTicketScratcher(model, total_steps=20)
        train(model, optimizer, scratcher, batches(12, size=16))
        return scratcher.stats()["frozen_ratio"]

    assert frozen_after("observed") > frozen_after("one") + 0.1


@pytest.mark.parametrize("per_channel", [False, True])
def test_channel_counts_from_the_update_match_the_state(per_channel):
    """The scratcher takes each layer's skippable and completable channels from the frozen counts its
    update returns (not from a second pass over the state): the same channels as the state gives."""
    config = LTSConfig(
        per_channel=per_channel, distance_momentum=0.5, freeze_warmup_ratio=0.0, channel_completion=0.6
    )
    model = prepare_model(tiny_resnet(), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scratcher = LotteryTicketScratcher(model, total_steps=30)
    train(model, optimizer, scratcher, batches(8, size=16))
    layers = quantized_layers(model).values()
    assert any(0 < layer.skipped_weight_grad_ratio < 1 for layer in layers)
    for layer in layers:
        active = layer._active_channels
        layer._refresh_active_channels()  # from the state
        assert (active is None) == (layer._active_channels is None)
        assert active is None or torch.equal(active, layer._active_channels)
        ratio = layer.frozen_mask.view(layer.weight.shape[0], -1).float().mean(1)
        assert not ((ratio >= 0.6) & (ratio < 1)).any()  # every channel past the share is complete
