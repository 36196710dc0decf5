"""Activation-gradient telemetry: where in the backward a gradient format loses the gradient.

Weight gradients alone cannot tell: once the gradient at the logits flushes to zero in fp16,
every gradient below it is an exact zero, which rounding no longer changes, so a weight
gradient's own flush count reads 0 while nothing trains (docs/precision.md). So, on telemetry
steps only, forward hooks installed from outside the model put an identity autograd probe on
the output of every block, of the final norm (the output head's input) and of the head (the
logits; the fused loss never materialises them, so there the head's input is the last probe).
Each probe sees the gradient that reaches it in the backward.

Two backward passes over the same graph (the first with retain_graph, before the real one):

  reference  the same backward, except that each probe multiplies the gradient passing through
             it by the power of two that brings its largest element into [2^7, 2^8) (REF_MAX_EXP):
             a loss scale chosen for that tensor, with headroom below fp16's 65504 for the block
             behind it.
             Its nonzero elements are the support: where a well-scaled backward carries gradient.
             Only activation gradients are computed (no .grad is touched, no weight gradient runs).
  real       the step's backward; each probe counts (telemetry.GradFormatStats) what storage in
             the gradient format F does to the gradient g arriving there: flushed (g != 0,
             F(g) == 0), subnormal, and lost = support and F(g) == 0 — zero here, whether
             flushed here or upstream (the case flushed cannot see).

The head's probe hands the loss fp32 logits with the same values (the loss upcasts them anyway), so
that it sees the loss's fp32 gradient before fp16 storage rounds it, on CUDA autocast as in the
CPU emulation. The passes assume the probes form a chain (logits -> head input -> last block ->
... -> first block), as in a stack of blocks: the reference pass asks only for the gradient at the
first block's output (of each forward since the last backward), which runs every probe above it.
On telemetry steps the precision runs compiled blocks eagerly (base.Precision.autocast): a compiled
backward donates its saved buffers and cannot run twice.
"""

from __future__ import annotations

import torch

from stagewise.precision.telemetry import GradFormatStats, sample

REF_MAX_EXP = 8  # the reference rescales each probe's largest |gradient| into [2^7, 2^8)


class _Probe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, site):
        ctx.site, ctx.dtype = site, x.dtype
        return x.float() if site.upcast and x.dtype != torch.float32 else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.site.backward(grad).to(ctx.dtype), None


class _Site:
    """One probe in one forward: its reference support, filled by the reference pass."""

    def __init__(self, probes: "ActGradProbes", name: str, upcast: bool):
        self.probes, self.name, self.upcast = probes, name, upcast
        self.support: torch.Tensor | None = None

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        if self.probes.in_reference:
            self.support = _support(grad)
            return _rescale(grad)
        self.probes.stats.add(self.name, grad, self.support)
        self.support = None
        return grad


def _support(grad: torch.Tensor) -> torch.Tensor:
    s = sample(grad)
    return (s != 0) & torch.isfinite(s)


def _rescale(grad: torch.Tensor) -> torch.Tensor:
    """grad * 2^k with the largest finite |element| in [2^(REF_MAX_EXP-1), 2^REF_MAX_EXP); exact in binary.
    An all-zero or all-nonfinite tensor passes unchanged. Stays on the device (no host sync)."""
    g = grad.float()
    amax = torch.where(torch.isfinite(g), g.abs(), 0.0).amax()
    _, e = torch.frexp(amax)  # amax = m * 2^e, m in [0.5, 1)
    # Clamped so that 2^k stays a finite fp32 (an fp32-subnormal amax then stops short of 2^8).
    k = torch.where(amax > 0, REF_MAX_EXP - e, 0).clamp(-126, 126).to(torch.float32)
    return torch.ldexp(g, k).to(grad.dtype)


def activation_sites(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """name -> module whose output is probed, as the model's forward calls them (compiled wrappers)."""
    sites = getattr(model, "activation_sites", None)
    return sites() if callable(sites) else {}


class ActGradProbes:
    """Arms the probes for one step (arm), runs the reference pass (reference_backward), reports (summary)."""

    def __init__(self, fmt: torch.dtype, reference: bool = True):
        self.fmt, self.reference = fmt, reference
        self.stats = GradFormatStats(fmt)
        self.in_reference = False
        self._handles: list = []
        self._armed_on: list[int] = []
        self._deepest: list[torch.Tensor] = []  # per forward since the last backward: the first probe's input

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self, model: torch.nn.Module) -> None:
        """Install the forward hooks (idempotent while the same modules are called)."""
        sites = activation_sites(model)
        if self._armed_on == [id(m) for m in sites.values()] and self._handles:
            return
        self.disarm()
        for i, (name, module) in enumerate(sites.items()):
            self._handles.append(module.register_forward_hook(self._hook(name, upcast=name == "logits", first=i == 0)))
        self._armed_on = [id(m) for m in sites.values()]

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._armed_on, self._deepest = [], [], []

    def _hook(self, name: str, upcast: bool, first: bool):
        def hook(module, args, out):
            if not (torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad):
                return None  # evaluation, sampling: nothing to probe
            if first:
                self._deepest.append(out)
            return _Probe.apply(out, _Site(self, name, upcast))
        return hook

    def reference_backward(self, loss: torch.Tensor) -> None:
        """The reference pass for the forwards run since the last backward (before the real backward)."""
        deepest, self._deepest = self._deepest, []
        if not self.reference or not deepest:
            return
        self.in_reference = True
        try:
            torch.autograd.grad(loss, deepest, retain_graph=True, allow_unused=True)
        finally:
            self.in_reference = False

    def summary(self) -> dict:
        """The step's activation-gradient keys (docs/precision.md); disarms and resets."""
        out = self.stats.summary("act_grad", per_layer=True)
        self.stats = GradFormatStats(self.fmt)
        self.disarm()
        return out
