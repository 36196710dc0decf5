"""The precision component: the only place the training loop asks about numerics.

The step function calls a Precision at fixed points, in this order:

    model = precision.setup(model)                 # once: cast / wrap modules
    optimizer = precision.setup_optimizer(opt)     # once: may replace the update rule (bf16-pure)
    with precision.autocast(): loss = ...          # forward under the compute dtype (telemetry steps:
                                                   #   activation-gradient probes armed, act_grads.py)
    precision.backward(loss)                       # scales the loss if the mode uses loss scaling
    precision.unscale_(optimizer)                  # gradients back to true scale, before clipping
    applied = precision.step(optimizer, grad_norm) # the optimizer-step hook: may skip the step
    precision.metrics()                            # telemetry of the step just taken (may be {})
    precision.state_dict() / load_state_dict()     # goes into every checkpoint

Modes (docs/precision.md says what is rounded where):
  fp32        everything fp32; on CUDA TF32 matmuls are switched off
  tf32        fp32 storage, TF32 tensor-core matmuls on CUDA (fp32 on CPU)
  bf16-mixed  bf16 autocast compute, fp32 weights/grads/AdamW states   (this file)
  fp16-mixed  fp16 compute + dynamic loss scaling, fp32 master weights (fp16.py)
  bf16-pure   bf16 weights and AdamW states, optional SR / Kahan       (pure_bf16.py)
  fp8, mxfp4, nvfp4, int8, int4, ternary
              linears swapped for fp8 / fake-quant wrappers, the rest bf16-mixed (quant.py)
A precision schedule switches between them during a run (schedule.py).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import warnings
from typing import Sequence

import torch

from stagewise.config.schema import PrecisionConfig
from stagewise.precision.cpu_bf16 import bf16_context, emulates


class Precision:
    """fp32: the reference every other mode is measured against."""

    name = "fp32"
    compute_dtype = torch.float32
    grad_format: torch.dtype | None = None  # the format gradient telemetry rounds to; None: no grad telemetry
    # Bytes per parameter, for `stagewise plan`: the stored weights (the nn.Parameters), their
    # gradients, a separate higher-precision master copy held outside the model (0 in every mode
    # here: in the mixed modes the fp32 parameters are the master and autocast makes the
    # low-precision working copy per forward), and the optimizer states (AdamW: exp_avg + exp_avg_sq).
    # Whether the model may fuse its output head with the loss (stagewise/model/loss.py); off
    # where this mode's numerics are implemented around the plain ops.
    fused_loss = True
    # Whether activation-gradient telemetry runs its reference backward (act_grads.py); off where a
    # second backward would change state (fp8 delayed-scaling histories, format counters).
    act_grad_reference = True
    param_bytes = 4
    grad_bytes = 4
    master_bytes = 0
    optim_state_bytes = 8

    def __init__(self, device: torch.device, cfg: PrecisionConfig | None = None):
        self.device = device
        self.cfg = cfg or PrecisionConfig(mode=self.name)
        self.steps = 0          # optimizer-step calls so far, skipped ones included (== the trainer's step)
        self._skipped, self._skipped_dev = 0, None
        self._metrics: dict = {}
        self._names: dict[int, str] = {}
        self._model: torch.nn.Module | None = None
        self._act = None  # ActGradProbes, on telemetry steps of modes with a grad_format

    # -- set-up ------------------------------------------------------------------------------

    def setup(self, model: torch.nn.Module, keep: Sequence[str] = ()) -> torch.nn.Module:
        """Prepare `model` for this mode, in place. keep: module name patterns (fnmatch) this mode
        leaves as they are (swaps and casts skip them): adapters' own weights, for example."""
        self.keep = tuple(keep)
        if self.device.type == "cuda":
            # Explicit, so a process that ran a tf32 stage before does not leak TF32 into fp32.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._model = model
        if hasattr(model, "fused_loss"):
            model.fused_loss = self.fused_loss
        return model

    def keeps(self, module_name: str) -> bool:
        """Whether setup leaves the module of this name alone."""
        return any(fnmatch.fnmatch(module_name, pattern) for pattern in getattr(self, "keep", ()))

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def teardown(self, model: torch.nn.Module) -> torch.nn.Module:
        """Undo setup (a precision schedule switches modes): plain modules, fp32 parameters."""
        if self._act is not None:
            self._act.disarm()
        self._model = None
        return model

    # -- the step ----------------------------------------------------------------------------

    def autocast(self):
        """The forward's numeric context. Before a telemetry step's forward it also arms the
        activation-gradient probes (removed again when the step's telemetry is read) and runs
        compiled blocks eagerly for that step: a compiled backward donates saved buffers, so it
        cannot run twice (the probes' reference pass), and the probes' Python stays out of graphs."""
        ctx = self.compute_context()
        if self.compute_dtype == torch.bfloat16:  # bf16 GEMMs as fp32 GEMMs on CPUs without them
            ctx = bf16_context(self.device, ctx)
        if self.grad_format is None or self._model is None or not self.telemetry_due():
            return ctx
        if self._act is None:
            from stagewise.precision.act_grads import ActGradProbes

            self._act = ActGradProbes(self.grad_format, reference=self.act_grad_reference)
        self._act.arm(self._model)
        stack = contextlib.ExitStack()
        stack.enter_context(torch.compiler.set_stance("force_eager"))
        stack.enter_context(ctx)
        return stack

    @contextlib.contextmanager
    def inference(self):
        """The numeric context of forward passes that train nothing (evaluation, generation, RL
        rollouts and their old-policy log-probs): the compute dtype as in training, no telemetry
        probes armed, and this mode's state (fp8 delayed-scaling amax histories, counters) restored
        on exit, so what such passes see never changes what the next training step does."""
        saved = copy.deepcopy(self.state_dict())
        ctx = self.compute_context()
        if self.compute_dtype == torch.bfloat16:
            ctx = bf16_context(self.device, ctx)
        try:
            with ctx:
                yield
        finally:
            self.load_state_dict(saved)

    @property
    def emulates_bf16(self) -> bool:
        """Whether this mode's bf16 matmuls run as fp32 GEMMs here (a CPU without a bf16 GEMM)."""
        return self.compute_dtype == torch.bfloat16 and emulates(self.device)

    @property
    def gemm_dtype(self) -> torch.dtype:
        """The dtype the GEMMs actually run in, whose measured peak MFU is taken against."""
        return torch.float32 if self.emulates_bf16 else self.compute_dtype

    def compiles(self, requested: bool, log=None) -> bool:
        """Whether train.compile is honoured: not under the bf16 emulation, where compiled blocks
        measured 1.16x slower than eager (docs/precision.md); `log` hears why."""
        if requested and self.emulates_bf16 and log is not None:
            log("note: train.compile is off under the CPU bf16 emulation (eager is faster there; docs/precision.md)")
        return requested and not self.emulates_bf16

    def compute_context(self):
        return contextlib.nullcontext()

    def telemetry_due(self) -> bool:
        """Whether the step about to run (number self.steps + 1) records gradient/update telemetry."""
        every = self.cfg.telemetry_every
        return bool(every) and (self.steps + 1) % every == 0

    def backward(self, loss: torch.Tensor) -> None:
        self._backward(loss)

    def _backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), preceded on telemetry steps by the probes' reference pass."""
        if self._act is not None and self._act.armed:
            self._act.reference_backward(loss)
        loss.backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> torch.Tensor:
        """Apply the update unless the gradients are non-finite; return whether it was applied
        (a 0-d bool tensor on the device: deciding does not wait for the device, see _apply).

        Without loss scaling a non-finite gradient is a real divergence, not an overflow to
        recover from: the step is skipped (weights stay finite) and the caller reports it.
        """
        self._metrics = {}
        if self.telemetry_due():
            self._metrics.update(self._grad_telemetry(optimizer, scale=1.0))
            self._metrics.update(self._act_telemetry())
        applied = torch.isfinite(grad_norm)
        _apply(optimizer, applied)
        self._count(applied)
        return applied

    def _count(self, applied: torch.Tensor) -> None:
        self.steps += 1
        # Kept on the device; reading `skipped` (checkpoints, telemetry) is what waits for it.
        skip = applied.logical_not().to(torch.int64)
        self._skipped_dev = skip if self._skipped_dev is None else self._skipped_dev + skip

    @property
    def skipped(self) -> int:
        if self._skipped_dev is not None:
            self._skipped += int(self._skipped_dev)
            self._skipped_dev = None
        return self._skipped

    @skipped.setter
    def skipped(self, value: int) -> None:
        self._skipped, self._skipped_dev = int(value), None

    def _grad_telemetry(self, optimizer, scale: float) -> dict:
        """Format-loss statistics of the gradients as held now (multiplied by `scale` first)."""
        if self.grad_format is None:
            return {}
        from stagewise.precision.telemetry import GradFormatStats

        stats = GradFormatStats(self.grad_format)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.ndim >= 2:
                    stats.add(self._names.get(id(p), "?"), p.grad.float() * scale)
        return stats.summary()

    def _act_telemetry(self) -> dict:
        """The activation-gradient keys of the step just backpropagated; disarms the probes."""
        return self._act.summary() if self._act is not None and self._act.armed else {}

    def metrics(self) -> dict:
        """Telemetry of the last step, merged into its metrics.jsonl line (empty on most steps)."""
        return dict(self._metrics)

    # -- checkpoint --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"mode": self.name, "steps": self.steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        # A precision schedule may change modes; only the counters carry over between them.
        self.steps = int(state.get("steps", 0))
        self.skipped = int(state.get("skipped", 0))


def _apply(optimizer: torch.optim.Optimizer, applied: torch.Tensor) -> None:
    """optimizer.step() unless `applied` is False, decided on the device where the optimizer can.

    Optimizers with `_step_supports_amp_scaling` (torch's fused AdamW/Adam/SGD) read a `found_inf`
    tensor, as torch.amp.GradScaler passes it: where it is 1 the fused kernel leaves weights and
    moments alone and the step count is taken back, all on the device. Others (foreach or for-loop
    AdamW, bf16-pure's update) have no such input, so the host reads `applied` first: a sync.
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = applied.logical_not().float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif applied:
        optimizer.step()


class TF32(Precision):
    """fp32 storage; on CUDA (Ampere+) fp32 matmuls run on tensor cores with 10-bit-mantissa inputs."""

    name = "tf32"
    _warned = False

    def setup(self, model, keep=()):
        model = super().setup(model, keep)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        elif not TF32._warned:
            TF32._warned = True
            warnings.warn("precision tf32: TF32 is a CUDA tensor-core format; on the CPU this run is plain fp32",
                          stacklevel=2)
        return model


class BF16Mixed(Precision):
    """bf16 autocast for matmuls; weights, gradients and AdamW states stay fp32.

    bf16 has fp32's exponent range, so gradients do not underflow and no loss scaling is
    needed (unlike fp16, Micikevicius et al. 2018).
    """

    name = "bf16-mixed"
    compute_dtype = torch.bfloat16
    grad_format = torch.bfloat16

    def compute_context(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
