"""`QuantConv2d` and `QuantLinear`: fake-quantized layers that carry their LTS state.

Each layer fake-quantizes its input (`ActivationFakeQuantizer`) and its weight (`WeightFakeQuantizer`)
and keeps, in buffers (so ``state_dict``, checkpoints and DDP carry them):

- ``lts_state``: the packed per-weight state (level, frozen flag, distance EMA / held latent),
  see `hf_lts.quantization.state`;
- ``lts_step``: optimizer steps the scratcher has seen; ``lts_frozen_steps``: Σ over those steps of
  this layer's frozen weights (for "weight updates saved"); ``lts_skipped_steps``: Σ over those steps of
  the share of the weight-gradient work that was skipped (for the *realised* backward saving);
  ``lts_macs``: forward multiply-accumulates per example, taken from the first training batch.

Input quantization, weight quantization and the convolution / matmul run as one autograd function, whose
backward does only the work that can still change something. On a CPU it is one C++ autograd node
(``hf_lts::quant_layer``, `hf_lts.quantization.native`: a Python autograd function's own per-layer work
cost more than its kernels on small models); elsewhere, and under autocast, tracing or a dispatch mode, the
Python function `QuantizedOp`, which computes the same bits:

- the layer's input is the only activation it keeps; the quantized input and the quantized weight are
  recomputed in the backward (memory as in fp32, where the layer keeps its input too; a fully frozen
  layer's quantized weight is kept by the layer anyway);
- the weight gradient is computed only for output channels that still have a trainable weight (a slice of
  the output gradient, and a weight backward kernel that reads only those rows), none for a fully frozen
  layer; a frozen weight contributes ``q · s`` with ``s`` detached, so its gradient is zero and it adds
  nothing to the step's gradient. Where only a few weights still train, scattered over the channels (the
  paper's stragglers), the native node computes their gradients only, one dot product each
  (`max_straggler_share`; equal to the dense gradient up to float summation order);
- the input gradient only where something needs it (not for the first layer's pixels; there the input
  step's gradient comes from the adjoint identity ``Σ ∂L/∂x̂ ⊙ ∂x̂/∂s = Σ ∂L/∂y ⊙ conv(∂x̂/∂s, ŵ)``, one
  forward convolution instead of a transposed one).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import backend as backends
from . import state
from .fused import lsq_forward
from .lsq import ActivationFakeQuantizer, WeightFakeQuantizer, broadcast_scale, quantize_levels
from .op import QuantizedOp, compute_dtype, distributed, native_layer_ops, traced_layer
from .padding import conv_padding


class QuantLayerMixin:
    """What `QuantConv2d` and `QuantLinear` share: quantizers, LTS state, frozen-weight handling."""

    weight: nn.Parameter

    def _setup_quantization(self, weight_bits: int, activation_bits: int, per_channel: bool) -> None:
        self.weight_quantizer = WeightFakeQuantizer(self.weight, weight_bits, per_channel)
        self.input_quantizer = ActivationFakeQuantizer(activation_bits)
        self.register_buffer("lts_state", self._initial_state())
        device = self.weight.device
        self.register_buffer("lts_step", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("lts_frozen_steps", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("lts_skipped_steps", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("lts_macs", torch.zeros((), dtype=torch.int64, device=device))
        # The step of a fully frozen weight, restored after every optimizer step (under DDP it gets zero
        # gradients, which momentum would turn into updates); derived, so not saved.
        self.register_buffer("lts_held_scale", self.weight_quantizer.scale.detach().clone(), persistent=False)
        self._refresh_cache()

    def _apply(self, fn, recurse: bool = True):
        """`nn.Module._apply`, and what the layer keeps beside its buffers follows (``.to(device)`` after
        freezing or loading elsewhere). The latent weight and the LTS state stay in the default layout
        (``model.to(memory_format=torch.channels_last)`` would convert them): neither reaches the convolution,
        its quantized copy does, and the kernels pair them element by element."""
        super()._apply(fn, recurse)
        if not self.lts_state.is_contiguous():
            self.lts_state = self.lts_state.contiguous()
        if not self.weight.is_contiguous():
            self.weight.data = self.weight.data.contiguous()
        if self._active_channels is not None:
            self._active_channels = self._active_channels.to(self.weight.device)
        self._held = None
        return self

    def _initial_state(self) -> torch.Tensor:
        """`state.initial_state` at the weight's current levels, computed one block of output channels at a
        time: weight-sized temporaries, freed after each layer's state was allocated, left holes under it
        in the heap (a ResNet-18's set-up: 230 MB of them, which training then spread its buffers over);
        blocks of about 64 K values are small and reused."""
        packed = torch.empty_like(self.weight, dtype=torch.int32)
        wq = self.weight_quantizer
        block = max(1, (1 << 16) // self.weight[0].numel())
        for start in range(0, self.weight.shape[0], block):
            rows = slice(start, start + block)
            levels, _ = quantize_levels(
                self.weight[rows], wq.scale[rows] if wq.per_channel else wq.scale, wq.qmin, wq.qmax
            )
            packed[rows] = state.initial_state(levels)
        return packed

    @classmethod
    def from_float(cls, module: nn.Module, weight_bits: int, activation_bits: int, per_channel: bool = False):
        """A quantized layer that takes over ``module``'s parameters (the same `nn.Parameter` objects)."""
        new = cls._empty_like(module)
        new.weight = module.weight
        new.bias = module.bias
        new._setup_quantization(weight_bits, activation_bits, per_channel)
        return new.train(module.training)

    # -- state -------------------------------------------------------------------------------------
    def _refresh_cache(self) -> None:
        # Python copies, so the forward pass never reads a device tensor to decide its path.
        self._num_frozen = int(state.frozen(self.lts_state).sum())
        self._held: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._macs_known = bool(self.lts_macs > 0)
        self._stragglers = False  # whether the last native backward computed the stragglers' gradients only
        self._refresh_channels()

    def _refresh_channels(self) -> None:
        """The active channels from the state, as the backend's scratcher sets them (so that a resumed run
        skips what the uninterrupted one does)."""
        if backends.select(self.weight.device, self.weight.dtype) == "native":
            self._refresh_active_channels()
        else:
            per_channel = state.frozen(self.lts_state).view(self.weight.shape[0], -1).sum(1)
            self._set_frozen_counts(per_channel.cpu().numpy())

    #: Skip frozen channels' weight gradients only from this share of them on: slicing the output
    #: gradient (and, for depthwise convolutions, the input) costs a copy, which a few skipped channels
    #: do not repay (measured in benchmarks/speed.py).
    min_skipped_share = 0.25

    #: The same off the CPU (compiled and eager backends): a GPU step of a few dozen layers at a batch of
    #: 64 is bound by the host's kernel launches, and the skipped channels' slices and index kernels cost
    #: more there than the arithmetic they save (ResNet-18 on an H200, 90 % of the channels skipped: 1.33 ×
    #: the dense step, `benchmarks.gpu_check`); only a fully frozen layer skips its weight gradient, which
    #: saves launches too.
    min_skipped_share_device = 1.0

    def _refresh_active_channels(self, frozen_per_channel: torch.Tensor | None = None) -> None:
        """``_active_channels``: the output channels whose weight gradient the backward computes — those
        that still have a trainable weight, or ``None`` (all) while fewer than `min_skipped_share` have
        none or where the layer cannot skip single channels; an empty tensor once every weight is frozen.
        ``frozen_per_channel`` (frozen weights per channel, as the scratcher's update counts them) saves
        reading the state."""
        if self._num_frozen == 0:
            self._active_channels = None
            return
        channels = self.weight.shape[0]
        if frozen_per_channel is None:
            trainable = ~state.frozen(self.lts_state).view(channels, -1).all(1)
        else:
            trainable = frozen_per_channel < self.weight[0].numel()
        active = trainable.nonzero().flatten()
        skipped = 1 - active.numel() / channels
        partial = active.numel() > 0  # (none left: the whole layer's weight gradient is skipped)
        keep_all = skipped < self.min_skipped_share or not self._skips_channels
        self._active_channels = None if partial and keep_all else active

    def _set_frozen_counts(self, per_channel: np.ndarray) -> None:
        """`_refresh_active_channels` from frozen weights per channel as the host has them (the compiled and
        eager scratcher read them back one step late, without waiting for the device: freezing is monotone,
        so a late active set only computes gradients that are exact zeros). The active channels are padded
        to a multiple of 8 with frozen ones: tensor-core friendly shapes, and no count of 1, for which the
        compiled kernels would specialise."""
        self._num_frozen = int(per_channel.sum())
        trainable = per_channel < self.weight[0].numel()
        active = np.flatnonzero(trainable)
        channels = self.weight.shape[0]
        if self._num_frozen == 0 or not self._skips_channels and active.size:
            self._active_channels = None
            return
        if active.size % 8:
            pad = np.flatnonzero(~trainable)[: 8 - active.size % 8]
            active = np.sort(np.concatenate([active, pad]))
        if active.size and 1 - active.size / channels < self.min_skipped_share_device:
            self._active_channels = None
            return
        active = torch.from_numpy(active)
        if self.weight.device.type == "cuda":  # a copy from pageable memory would wait for the device
            active = active.pin_memory()
        self._active_channels = active.to(self.weight.device, non_blocking=True)

    #: Whether the backward skips the weight gradient of single frozen output channels (else only of a
    #: fully frozen layer).
    _skips_channels = True

    #: Up to this share of trainable weights the native backward computes the weight gradient of those
    #: weights only, one dot product each, instead of the dense weight-gradient convolution / GEMM (the
    #: paper's stragglers: a few weights per channel that keep a layer from being skipped); measured on
    #: ResNet-18's layers in benchmarks/README.md.
    max_straggler_share = 0.02

    #: ... where that is the cheaper way, by a cost model in units of the dense op's multiply-accumulates,
    #: fitted on this project's CPU (ResNet-18, MobileNetV2 and the small models' layers, benchmarks/README.md):
    #: the dense op costs a fixed ``2e6`` plus its arithmetic; the dot products cost 10 per product and 30
    #: per value of the input and output gradient they first copy (batch innermost). Layers with few
    #: weights and large activations (early and depthwise convolutions) stay dense.
    straggler_costs = (2e6, 10.0, 30.0)

    def _stragglers_only(self, x: torch.Tensor) -> bool:
        """Whether this step's weight gradient is computed for the trainable weights only (above)."""
        weights = self.weight.numel()
        trainable = weights - self._num_frozen
        stragglers = False
        if self._skips_channels and 0 < trainable <= self.max_straggler_share * weights:
            terms = self._terms_per_weight(x)  # products in one weight's gradient
            fixed, per_product, per_copy = self.straggler_costs
            copies = x.numel() + terms * self.weight.shape[0]
            stragglers = per_product * trainable * terms + per_copy * copies < fixed + weights * terms
        if stragglers != self._stragglers:  # (a Module attribute write costs microseconds: only on change)
            self._stragglers = stragglers
        return stragglers

    @property
    def skipped_weight_grad_ratio(self) -> float:
        """Share of the weight-gradient arithmetic the backward skips now: the frozen share of the weights
        where it computes the stragglers' gradients only, else the share of output channels it skips."""
        if self._num_frozen == self.weight.numel():
            return 1.0
        if self._stragglers:
            return self._num_frozen / self.weight.numel()
        if self._active_channels is None:
            return 0.0
        return 1.0 - self._active_channels.numel() / self.weight.shape[0]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:
        key = prefix + "lts_skipped_steps"
        if key not in state_dict:  # a checkpoint from before the realised-saving counter
            state_dict[key] = torch.zeros((), dtype=torch.float64)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        scale = state_dict.get(prefix + "weight_quantizer.scale")  # (the child loads it after this hook)
        if scale is not None and scale.shape == self.lts_held_scale.shape:
            self.lts_held_scale.copy_(scale)
        self._refresh_cache()

    @property
    def frozen_mask(self) -> torch.Tensor:
        """Which weights are frozen (bool, weight-shaped; a fresh tensor: change it with `freeze_`)."""
        return state.frozen(self.lts_state)

    @property
    def num_frozen(self) -> int:
        return self._num_frozen

    @property
    def weight_levels(self) -> torch.Tensor:
        """The integer level of every weight: the frozen level of frozen weights, the last tracked level
        of the others (int32, weight-shaped)."""
        return state.levels(self.lts_state)

    @torch.no_grad()
    def freeze_(self, mask: torch.Tensor) -> None:
        """Freeze the weights selected by ``mask`` (in addition to those already frozen) at their current
        level. Freezing is permanent."""
        mask = mask.to(device=self.weight.device, dtype=torch.bool).expand_as(self.weight)
        levels, _ = self.weight_quantizer.levels(self.weight)
        self._freeze_at(mask & ~self.frozen_mask, levels)
        self._refresh_channels()

    @torch.no_grad()
    def _freeze_at(self, new: torch.Tensor, levels: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Freeze ``new`` (trainable weights) at ``levels``: snap the latent value onto the level, once.

        With ``rows``, ``new`` and ``levels`` cover those output channels only: channel completion freezes a
        few channels per step, and a whole-tensor pass per layer and step cost more than the update itself.
        The caller refreshes ``_active_channels``.
        """
        scale = broadcast_scale(self.weight_quantizer.scale.detach(), self.weight.ndim)
        current, weight = self.lts_state, self.weight
        if rows is not None:
            current, weight = current.index_select(0, rows), weight.index_select(0, rows)
            scale = scale.index_select(0, rows) if scale.numel() > 1 else scale
        packed = state.pack_frozen(levels, levels * scale)
        frozen_state = torch.where(new, packed, current)
        frozen_weight = torch.where(new, state.latent(packed).to(weight.dtype), weight)
        if rows is None:
            self.lts_state.copy_(frozen_state)
            self.weight.copy_(frozen_weight)
        else:
            self.lts_state.index_copy_(0, rows, frozen_state)
            self.weight.index_copy_(0, rows, frozen_weight)
        self._note_frozen(int(new.sum()))

    def _note_frozen(self, count: int) -> None:
        """``count`` more weights froze; once all have, the step is held from now on (`_restore_frozen`)."""
        self._num_frozen += count
        if count and self._num_frozen == self.weight.numel():
            self.lts_held_scale.copy_(self.weight_quantizer.scale.detach())

    @torch.no_grad()
    def _restore_frozen(self) -> None:
        """Undo whatever the optimizer did to frozen latent weights (momentum, weight decay, …), and to the
        step of a fully frozen weight (DDP's zero gradients under momentum)."""
        if self._num_frozen:
            held = state.latent(self.lts_state).to(self.weight.dtype)
            self.weight.copy_(torch.where(self.frozen_mask, held, self.weight))
        if self._num_frozen == self.weight.numel():
            self.weight_quantizer.scale.detach().copy_(self.lts_held_scale)

    # -- forward -----------------------------------------------------------------------------------
    def _packed(self) -> torch.Tensor | None:
        """The LTS state where some weight is frozen (``None`` saves the kernel the frozen test)."""
        return self.lts_state if self._num_frozen else None

    def _held_weight(self, backend: str = "native") -> torch.Tensor | None:
        """``q · s`` of a fully frozen layer, or ``None`` while some weight trains. Nothing in it can move
        until its state or step size is written (no gradient reaches either), so it is made once and kept
        for as long as their versions stand: the forward skips a weight-sized pass per step."""
        if self._num_frozen < self.weight.numel():
            if self._held is not None:
                self._held = None
            return None
        scale = self.weight_quantizer.scale
        key = (self.lts_state._version, scale._version, self.lts_state.data_ptr(), scale.data_ptr())
        if self._held is None or self._held[0] != key:
            wq = self.weight_quantizer
            w_hat = lsq_forward(
                self.weight.detach().float(), scale.detach(), wq.qmin, wq.qmax, self.lts_state, backend, True
            )
            self._held = (key, w_hat)
        return self._held[1]

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight: LSQ for trainable weights, ``q · s`` (no gradient) for frozen ones."""
        return self.weight_quantizer(self.weight, self._packed())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_quantizer._initialized:
            if torch.compiler.is_compiling():  # (the frames that call an uninitialised layer run eagerly)
                torch._dynamo.skip_frame("hf_lts: the first batch initialises the input quantizers")
            return self._first_forward(x)
        return self._forward(x)

    @torch.compiler.disable
    def _first_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward that initialises the input quantizer from ``x`` (the first training batch), never
        traced by `torch.compile`: the step's sign depends on the data."""
        self.input_quantizer.initialize_from(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        aq, wq = self.input_quantizer, self.weight_quantizer
        backend = backends.select(x.device, self.weight.dtype)
        ops = native_layer_ops(x, self.weight, backend)
        traced = torch.compiler.is_compiling()
        if traced and compute_dtype(x.device) == torch.float32:
            out = traced_layer(x, self)
        elif ops is not None:  # the same computation as `QuantizedOp`, as one C++ autograd node
            out = ops.quant_layer(
                x, self.weight, aq.scale, wq.scale, self.bias, self._packed(), self._held_weight(),
                self._active_channels, (aq.qmin, aq.qmax, wq.qmin, wq.qmax), (aq.grad_factor(x), wq.grad_factor),
                self._native_op_args, distributed(), self._stragglers_only(x),
            )  # fmt: skip
        else:
            if self._stragglers:
                self._stragglers = False
            out = QuantizedOp.apply(x, self.weight, self.bias, aq.scale, wq.scale, self, backend)
        # a linear layer's output of a >2-D input: model code may change it in place (a traced graph has no views)
        if not traced and out._is_view():
            out = torch.ops.aten._unsafe_view(out, out.shape)
        if self.training and not self._macs_known:
            self.lts_macs.fill_(out[0].numel() * self.weight[0].numel())
            self._macs_known = True
        return out


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """`nn.Conv2d` (any ``groups``, depthwise included) with LSQ fake quantization and LTS freezing.

    Weight gradients are skipped per output channel for ``groups == 1`` and depthwise convolutions; other
    grouped convolutions skip them only once the whole layer is frozen.
    """

    @classmethod
    def _empty_like(cls, m: nn.Conv2d) -> QuantConv2d:
        padding, input_pad = conv_padding(m)
        new = cls(
            m.in_channels, m.out_channels, m.kernel_size, m.stride, padding, m.dilation, m.groups,
            m.bias is not None, device="meta", dtype=m.weight.dtype,
        )  # fmt: skip
        # pads the input where integer zero padding cannot express the original padding (`conv_padding`)
        new.register_module("input_pad", input_pad)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self._modules.get("input_pad")
        return super().forward(x if pad is None else pad(x))

    @property
    def _skips_channels(self) -> bool:
        return self.groups == 1 or self.groups == self.in_channels == self.out_channels

    @property
    def _native_op_args(self) -> list[int]:
        """The convolution for ``hf_lts::quant_layer``: stride, padding, dilation (two each) and groups."""
        return [*self.stride, *self.padding, *self.dilation, self.groups]

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    @staticmethod
    def _channel_view(t: torch.Tensor) -> torch.Tensor:
        """A per-output-channel (or single) value broadcast over the output ``[N, C, H, W]``."""
        return t.view(1, -1, 1, 1)

    def _terms_per_weight(self, x: torch.Tensor) -> int:
        """Examples × output positions: the products summed in one weight's gradient."""
        size = [
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(
                x.shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation, strict=True
            )
        ]
        return x.numel() // x.shape[-3:].numel() * size[0] * size[1]

    def _conv_backward(self, grad_out, x, w, groups, mask):
        bias_sizes = [grad_out.shape[1]] if mask[2] else None
        return torch.ops.aten.convolution_backward(
            grad_out, x, w, bias_sizes, self.stride, self.padding, self.dilation, False, [0, 0], groups, mask
        )

    def _grad_input(
        self, grad_out: torch.Tensor, x: torch.Tensor | torch.Size, w: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(x, torch.Size):  # only the input's shape is read (as in torch.nn.grad)
            x = grad_out.new_empty(1).expand(x)
        return self._conv_backward(grad_out, x, w, self.groups, [True, False, False])[0]

    def _grad_weight(
        self, grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, active: torch.Tensor | None
    ) -> torch.Tensor:
        depthwise = self.groups == self.in_channels == self.out_channels
        if active is None:
            return self._conv_backward(grad_out, x, w, self.groups, [False, True, False])[1]
        x_part = x.index_select(1, active) if depthwise else x
        groups = active.numel() if depthwise else 1
        return self._conv_backward(
            grad_out.index_select(1, active), x_part, w.index_select(0, active), groups, [False, True, False]
        )[1]

    def _grad_bias(self, grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._conv_backward(grad_out, x, w, self.groups, [False, False, True])[2]


class QuantLinear(QuantLayerMixin, nn.Linear):
    """`nn.Linear` with LSQ fake quantization and LTS freezing (weight gradients skipped per output row)."""

    @classmethod
    def _empty_like(cls, m: nn.Linear) -> QuantLinear:
        return cls(m.in_features, m.out_features, m.bias is not None, device="meta", dtype=m.weight.dtype)

    #: ``hf_lts::quant_layer``'s description of a linear layer.
    _native_op_args: list[int] = []

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    @staticmethod
    def _channel_view(t: torch.Tensor) -> torch.Tensor:
        """A per-output-feature (or single) value broadcast over the output ``[..., C]``."""
        return t.view(-1)

    def _terms_per_weight(self, x: torch.Tensor) -> int:
        return x.numel() // self.in_features

    def _grad_input(
        self, grad_out: torch.Tensor, x: torch.Tensor | torch.Size, w: torch.Tensor
    ) -> torch.Tensor:
        return grad_out.matmul(w)

    def _grad_weight(
        self, grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, active: torch.Tensor | None
    ) -> torch.Tensor:
        g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        if active is None:
            return g2.t().mm(x2)
        return g2.index_select(1, active).t().mm(x2)

    def _grad_bias(self, grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
