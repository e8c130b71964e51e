"""The sequential calibration stream: the activations entering one decoder layer, and how they move on.

Every walk over the layers (the pruning driver, the split search, the width search) uses this one
component: capture the inputs of layer 0 once, copy one layer at a time to the device in the forward
dtype, gather the Gram matrices at a consumer's input (two folds, even and odd samples), and advance
the stream through the layer, either by rerunning it or, where the FFN's output is the layer's last
addition to the residual stream, from what the FFN statistics pass kept (one matrix product).
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass

import torch
from torch import nn

from faspx.restore import add_gram


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the statistics it needs are collected."""


@dataclass
class Moments:
    """Gram matrices at a consumer's input, float64: one per fold (even, odd samples); with
    ``stream_weighted`` also sum_t x_t x_t^T / ||h_t||^2 (h_t: the layer's input at token t).
    ``column_norms``: each input column's L2 norm over one sample's tokens, averaged over samples
    (2SSP's neuron score)."""

    folds: list[torch.Tensor]
    stream_gram: torch.Tensor | None = None
    column_norms: torch.Tensor | None = None

    @property
    def gram(self) -> torch.Tensor:
        """The Gram matrix of all calibration tokens."""
        return self.folds[0] + self.folds[1]


class Stream:
    """The calibration activations (one tensor per sample) entering the current decoder layer.

    ``layer_kwargs`` are what the model passes its layers (masks, positions, rotary embeddings): the
    same for every sample of one length. ``device``/``dtype``: where and in what each layer runs.
    """

    def __init__(self, hidden: list[torch.Tensor], layer_kwargs: dict, device: torch.device, dtype: torch.dtype):
        self.hidden, self.layer_kwargs, self.device, self.dtype = hidden, layer_kwargs, device, dtype

    @classmethod
    @torch.no_grad()
    def capture(cls, model: nn.Module, layers: nn.ModuleList, calib_ids: torch.Tensor, device: torch.device,
                dtype: torch.dtype) -> Stream:
        """The inputs of decoder layer 0 for every calibration sample.

        Everything but the decoder layers visits ``device`` in ``dtype`` for the time of the capture.
        """
        layer_params = {id(p) for p in layers.parameters()}
        moved: list[tuple[nn.Parameter, torch.Tensor]] = []
        seen: set[int] = set()
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if id(p) in layer_params or id(p) in seen:
                    continue
                seen.add(id(p))
                moved.append((p, p.data))
                p.data = p.data.to(device=device, dtype=dtype if p.is_floating_point() else p.dtype)
        buffers = [(m, n, b) for m in model.modules() for n, b in m.named_buffers(recurse=False)
                   if not any(b is lb for lb in layers.buffers())]
        for m, n, b in buffers:
            m._buffers[n] = b.to(device)

        hidden: list[torch.Tensor] = []
        captured: dict = {}
        store = storage_device(calib_ids.numel() * model.config.hidden_size * dtype.itemsize, device)

        def grab(_module, args, kwargs):
            hidden.append((args[0] if args else kwargs["hidden_states"]).detach().to(store))
            if not captured:
                captured.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise _Stop

        handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for sample in calib_ids:
                try:
                    model(input_ids=sample.unsqueeze(0).to(device), use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
            for p, data in moved:
                p.data = data
            for m, n, b in buffers:
                m._buffers[n] = b
        return cls(hidden, captured, device, dtype)

    def part(self, start: int, stop: int) -> Stream:
        """A stream of copies of samples ``start:stop`` (the searches walk it without touching this one)."""
        return Stream([h.clone() for h in self.hidden[start:stop]], self.layer_kwargs, self.device, self.dtype)

    def samples_holding(self, tokens: int) -> int:
        """How many samples hold at least ``tokens`` tokens (all of them at most)."""
        return min(len(self.hidden), -(-tokens // self.hidden[0].shape[1]))

    def on_device(self, layer: nn.Module) -> nn.Module:
        """A copy of ``layer`` on the device in the forward dtype (the master weights stay where they are)."""
        return copy.deepcopy(layer).to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def consumer_stats(self, work: nn.Module, consumer: str, *, residual: str | None = None,
                       stash: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                       stream_weighted: bool = False, gram: bool = True) -> Moments:
        """The Moments at the input of ``work``'s module ``consumer`` over every sample; without ``gram``
        only the column norms (no folds: what 2SSP's selection without restoration needs).

        With ``stash`` (a list; ``residual`` must name a module that runs before the consumer), the
        inputs of both are appended to it per sample, kept where that sample's hidden state is.
        """
        module = work.get_submodule(consumer)
        n = module.in_features

        def zeros():
            return torch.zeros(n, n, dtype=torch.float64, device=module.weight.device)

        moments = Moments([zeros(), zeros()] if gram else [], zeros() if stream_weighted else None,
                          torch.zeros(n, dtype=torch.float64, device=module.weight.device))
        for j, x in enumerate(self.hidden):
            if stash is not None:
                res, x_in = module_inputs(work, (residual, consumer), x, self.layer_kwargs)
                stash.append((res.to(x.device), x_in.to(x.device)))
            else:
                (x_in,) = module_inputs(work, (consumer,), x, self.layer_kwargs)
            x_in = x_in.reshape(-1, n).float()
            if gram:
                with exact_bf16_products(module):
                    add_gram(moments.folds[j % 2], x_in)
            moments.column_norms.add_(x_in.double().pow(2).sum(dim=0).sqrt().to(moments.column_norms.device))
            if stream_weighted:
                energy = x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=1).clamp_min(1e-12)
                moments.stream_gram.add_((x_in / energy[:, None].to(x_in.device)).T @ x_in)
        moments.column_norms /= max(1, len(self.hidden))
        return moments

    @torch.no_grad()
    def advance(self, work: nn.Module) -> None:
        """Replace every hidden state by ``work``'s output on it (kept where it was stored)."""
        for j, x in enumerate(self.hidden):
            out = work(x.to(self.device), **self.layer_kwargs)
            self.hidden[j] = (out[0] if isinstance(out, tuple) else out).to(x.device)

    @torch.no_grad()
    def advance_stashed(self, consumer: nn.Module, keep_cols: torch.Tensor | None,
                        stash: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Replace every hidden state by residual + ``consumer``(its kept input columns), ``stash``
        holding (residual, consumer input) per sample; ``keep_cols`` None reads every column."""
        consumer = copy.deepcopy(consumer).to(device=self.device, dtype=self.dtype)
        for j, (res, x_in) in enumerate(stash):
            x_in = x_in.to(self.device)
            if keep_cols is not None:
                x_in = x_in[..., keep_cols.to(self.device)]
            out = res.to(self.device) + consumer(x_in)
            self.hidden[j] = out.reshape(self.hidden[j].shape).to(self.hidden[j].device)
        stash.clear()

    def stash_fits(self, ffn_width: int) -> bool:
        """Whether the FFN's residual and consumer inputs of every sample fit beside the stream."""
        nbytes = sum(h.numel() // h.shape[-1] * (h.shape[-1] + ffn_width) * h.element_size() for h in self.hidden)
        return stash_fits(nbytes, self.hidden[0].device)

    def energy(self) -> float:
        """sum ||h||^2 over the stream (float32 sums per sample)."""
        return sum(float(x.float().pow(2).sum()) for x in self.hidden)

    def distance(self, other: Stream) -> float:
        """sum ||h - h'||^2 between two streams of the same samples."""
        return sum(float((y.float() - x.float()).pow(2).sum()) for y, x in zip(self.hidden, other.hidden, strict=True))


def module_inputs(layer: nn.Module, names: tuple[str, ...], x: torch.Tensor, layer_kwargs: dict) -> list[torch.Tensor]:
    """The first inputs of the modules ``names`` when ``layer`` runs on ``x``, as they were (shape, dtype).

    The forward stops once the last of ``names`` has seen its input (they must run in that order).
    """
    seen: list[torch.Tensor] = []

    def grab(_module, args):
        seen.append(args[0])
        if len(seen) == len(names):
            raise _Stop

    handles = [layer.get_submodule(name).register_forward_pre_hook(grab) for name in names]
    try:
        layer(x.to(layer.get_submodule(names[-1]).weight.device), **layer_kwargs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


@contextlib.contextmanager
def exact_bf16_products(consumer: nn.Module):
    """Within, when ``consumer`` is a bfloat16 module on the CPU: float32 matrix products run on the
    CPU's bfloat16 units (oneDNN), with float32 sums.

    For the Gram of that consumer's inputs, which hold bfloat16 values (float32 tensors made from its
    bfloat16 inputs): their products are exact in float32 and the sums stay float32, so the Gram is as
    accurate as the plain float32 product (more, in a test: 3.6e-7 vs 1e-6 relative) and about 3x
    faster where the CPU has AMX. Other operands would be rounded to bfloat16, hence the scope.
    """
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    enabled = consumer.weight.dtype == torch.bfloat16 and consumer.weight.device.type == "cpu"
    if not enabled or matmul is None or not hasattr(matmul, "fp32_precision"):
        yield
        return
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def storage_device(nbytes: int, device: torch.device) -> torch.device:
    """Keep the layer activations on the GPU when they take under a third of its free memory."""
    if device.type == "cuda" and stash_fits(nbytes, device):
        return device
    return torch.device("cpu") if device.type == "cuda" else device


def stash_fits(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` more fit where the layer activations are kept: under a third of the GPU's
    free memory, or under half of the host's free memory (False where that can't be read)."""
    if device.type == "cuda":
        return nbytes < torch.cuda.mem_get_info(device)[0] / 3
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return False
    return nbytes < free / 2
