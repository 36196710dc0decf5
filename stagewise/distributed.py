"""Training on several processes with torch.distributed: DDP, FSDP2 and HSDP under torchrun.

    torchrun --nproc_per_node=N -m stagewise run RECIPE          (one machine)
    torchrun --nnodes=M --nproc_per_node=N --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:PORT --rdzv-id=JOB -m stagewise run RECIPE   (every machine)

`parallel.strategy` (docs/distributed.md):
  ddp    every rank holds the whole model; DistributedDataParallel averages the gradients
  fsdp2  torch's fully_shard on every block and the root: parameters, gradients and AdamW
         states sharded over all ranks (a 1-D mesh)
  hsdp   fully_shard over a 2-D mesh (replicate x shard): sharded within a group of
         `parallel.shard` ranks, replicated across `parallel.replicate` groups
  auto   ddp when torchrun started more than one process, else a single process

The data is world-size independent. Every rank draws the same *global* micro-batch of
`train.batch_size` rows from the stage's source (cheap: token windows are memmap reads), counts
its targets (the loss normaliser is the global count, so no collective is needed for it) and keeps
its own contiguous `batch_size / world_size` rows. The source's position is therefore the same
on every rank and is the global cursor a checkpoint stores: a run resumed at another world size
continues with exactly the same global batches.

Each rank's loss is its rows' summed loss over the global normaliser, multiplied by the world
size because DDP and FSDP2 average gradients over ranks; the sum of the ranks' losses, gathered
in one all-reduce with the objective's metric sums and counts, is the step's loss.

Rank 0 alone creates the run directory, writes metrics and memory.json, prints, samples and
exports; every rank takes part in checkpoints (DCP is collective) and in evaluation (sharded
forwards are collective). Sharding is applied beside the model (train/setup.py step 5), never
inside its code.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from stagewise.errors import ConfigError

# What fsdp2/hsdp shard, and why the rest is refused (docs/distributed.md):
SHARDED_PRECISIONS = ("fp32", "tf32", "bf16-mixed")
SHARDED_OPTIMIZERS = ("adamw",)
UNSHARDED_KINDS = ("dpo", "rl")  # their batches carry per-pair / per-rollout fields no row slice keeps whole
ROW_FIELDS = ("inputs", "targets", "positions", "doc_ids", "weights", "demo")
# Test hook: with STAGEWISE_DEBUG_KILL_AT_STEP, only this rank kills itself (tests/test_distributed.py).
KILL_RANK_ENV = "STAGEWISE_DEBUG_KILL_RANK"


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolved_strategy(strategy: str, world_size: int) -> str:
    """none for a single process, whatever the recipe says; auto is ddp on several."""
    if world_size == 1:
        return "none"
    return "ddp" if strategy == "auto" else strategy


def mesh_shape(pcfg, world_size: int) -> tuple[int, int]:
    """(replicate, shard) of the device mesh of `strategy` at `world_size`."""
    strategy = resolved_strategy(pcfg.strategy, world_size)
    if strategy == "hsdp":
        replicate = pcfg.replicate
        shard = pcfg.shard or (world_size // replicate if replicate else 0)
        return replicate, shard
    if strategy == "fsdp2":
        return 1, world_size
    return world_size, 1


def check_parallel(cfg, world_size: int) -> None:
    """One-line ConfigErrors for `parallel:` settings this many ranks or this recipe cannot run."""
    p = cfg.parallel
    strategy = resolved_strategy(p.strategy, world_size)
    if p.strategy == "none" and world_size > 1:
        raise ConfigError(f"parallel.strategy: none, but torchrun started {world_size} processes; "
                          "set ddp, fsdp2 or hsdp (or auto), or run without torchrun")
    if p.strategy == "hsdp":
        if p.replicate < 2:
            raise ConfigError(f"parallel.replicate: hsdp needs >= 2 replica groups, got {p.replicate} "
                              "(1 replica group is fsdp2)")
        if world_size > 1:
            shard = p.shard or world_size // p.replicate
            if shard < 2 or p.replicate * shard != world_size:
                raise ConfigError(f"parallel: hsdp with replicate {p.replicate} x shard {p.shard or 'auto'} needs "
                                  f"{p.replicate * max(shard, 2)} ranks (shard >= 2), torchrun started {world_size}; "
                                  f"valid here: a replicate x shard product of {world_size} with both >= 2, or fsdp2")
    if strategy == "none":
        return
    kinds = {s.kind for s in cfg.stages} if cfg.stages else {cfg.kind}
    if kinds & set(UNSHARDED_KINDS):
        raise ConfigError(f"parallel.strategy: {strategy} trains kinds lm and sft; a {sorted(kinds & set(UNSHARDED_KINDS))[0]} "
                          "stage runs in one process (its pairs and rollouts are not split across ranks yet)")
    stage_cfgs = _stage_configs(cfg)
    modes = [sc.precision.mode for _, sc in stage_cfgs]
    if "bf16-pure" in modes and len(set(modes)) > 1:
        raise ConfigError(f"stages: a change of precision to or from bf16-pure (modes {modes}) recasts the parameters, "
                          f"which {strategy} cannot follow; use one mode for all stages, or one process")
    sft_losses = [s.sft.loss for s in cfg.stages if s.kind == "sft"] if cfg.stages else \
        ([cfg.sft.loss] if cfg.kind == "sft" else [])
    if strategy == "ddp" and "asft" in sft_losses:
        raise ConfigError("sft.loss: asft runs the model's trunk outside DDP's forward, so DDP would not reduce its "
                          "gradients; use parallel.strategy: fsdp2, or sft.loss ce or dft")
    for where, sc in stage_cfgs:
        _check_stage(where, sc, strategy, world_size)


def _check_stage(where: str, sc, strategy: str, world_size: int) -> None:
    """One stage's settings against the strategy (where: its recipe prefix, "" for a plain recipe)."""
    if sc.train.batch_size % world_size:
        raise ConfigError(f"{where}train.batch_size: {sc.train.batch_size} rows do not split over {world_size} ranks; "
                          f"use a multiple of {world_size} (it is the global micro-batch)")
    if strategy in ("fsdp2", "hsdp"):
        if sc.precision.mode not in SHARDED_PRECISIONS:
            raise ConfigError(f"{where}precision.mode: {sc.precision.mode} cannot be sharded with {strategy} (valid: "
                              f"{', '.join(SHARDED_PRECISIONS)}; docs/distributed.md says why); use "
                              "parallel.strategy: ddp")
        if sc.optim.name not in SHARDED_OPTIMIZERS:
            raise ConfigError(f"{where}optim.name: {sc.optim.name} cannot run on {strategy}'s sharded matrices (valid: "
                              f"{', '.join(SHARDED_OPTIMIZERS)}; projections and Newton-Schulz need whole matrices, "
                              "8/4-bit codes are per-shard blocks); use parallel.strategy: ddp")
        if sc.adapter.kind != "none":
            raise ConfigError(f"{where}adapter.kind: {sc.adapter.kind} is not sharded by {strategy} yet; adapters train "
                              "under parallel.strategy: ddp")
    if sc.precision.schedule:
        raise ConfigError(f"{where}precision.schedule: switching precision mid-stage is not supported with "
                          f"{strategy} (the gradient buckets are built for the parameters' dtype); train the "
                          "phases as stages, or in one process")
    if sc.precision.mode == "fp8":
        raise ConfigError(f"{where}precision.mode: fp8 keeps per-rank amax histories that are not synchronised; "
                          "train fp8 in one process, or bf16-mixed on several")


def _stage_configs(cfg):
    if not cfg.stages:
        return [("", cfg)]
    from stagewise.train import stages as plan

    return [(f"stages[{i}] ({s.name}): ", plan.stage_config(cfg, i)) for i, s in enumerate(cfg.stages)]


@dataclass
class World:
    """This process's place in the job. size 1: a single process, every method a no-op."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "none"
    mesh: object = None
    pcfg: object = None
    run_dir: str = "RUN_DIR"  # for messages, once the run directory is known
    checkpoint_group: object = field(default=None, repr=False)  # gloo group of async checkpoint writes

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def broadcast(self, value):
        """rank 0's Python value on every rank."""
        if not self.on:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's Python value, in rank order, on every rank."""
        if not self.on:
            return [value]
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def all(self, flag: bool) -> bool:
        """Whether every rank's flag is set."""
        return not self.any(not flag)

    def any(self, flag: bool) -> bool:
        """Whether any rank's flag is set (a stop request must stop all ranks at the same step)."""
        if not self.on:
            return flag
        t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @property
    def comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    @contextlib.contextmanager
    def main_first(self):
        """rank 0 runs the block first (data preparation fills a cache the others then read)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def shard_batch(self, batch):
        """This rank's contiguous rows of a global micro-batch."""
        if not self.on:
            return batch
        tensors = batch.tensors()
        extra = sorted(set(tensors) - set(ROW_FIELDS))
        assert not extra, f"batch fields {extra} cannot be split by rows"
        rows = tensors["inputs"].shape[0] // self.size
        lo = self.rank * rows
        return type(batch)(**{k: v[lo:lo + rows] for k, v in tensors.items()})

    def kills_here(self) -> bool:
        chosen = os.environ.get(KILL_RANK_ENV)
        return chosen is None or int(chosen) == self.rank

    def close(self) -> None:
        """Leave the job once every rank is done (rank 0 exports and samples while the others wait)."""
        if self.on and dist.is_initialized():
            try:
                dist.barrier()
                dist.destroy_process_group()
            except RuntimeError:
                # gloo: a rank that leaves the barrier first may close its sockets while another is still
                # reading the barrier's last message; every rank's work is done by then
                pass


WORLD = World()  # the process's world once init_world has run; a single process before


def init_world(pcfg, device: torch.device) -> World:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    environment); without torchrun, the single-process World."""
    size = launched_world_size()
    if size == 1:
        return _become(World(pcfg=pcfg))
    backend = pcfg.backend if pcfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=pcfg.timeout_s))
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    strategy = resolved_strategy(pcfg.strategy, size)
    mesh = None
    if strategy in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh

        replicate, shard = mesh_shape(pcfg, size)
        if strategy == "hsdp":
            mesh = init_device_mesh(device.type, (replicate, shard), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh(device.type, (shard,), mesh_dim_names=("shard",))
    # Async checkpoint writes gather their plans in a thread: on a group of their own, so that they never
    # interleave with the training's collectives.
    group = dist.new_group(backend="gloo")
    return _become(World(rank, size, local_rank, strategy, mesh, pcfg, checkpoint_group=group))


def _become(world: World) -> World:
    """WORLD is one object that modules import once: it changes in place."""
    WORLD.__dict__.update(world.__dict__)
    return WORLD


def reset_world() -> None:
    """Back to a single process (after close; tests that run several jobs in one process)."""
    _become(World())


def lost_peer_message(error: BaseException) -> str | None:
    """One line for a collective that failed because another rank is gone (killed, crashed, out of
    memory); None for any other error. The published checkpoints are untouched: saves are atomic."""
    if not WORLD.on or not isinstance(error, (RuntimeError, dist.DistError)):
        return None
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if not isinstance(error, dist.DistError) and not any(
            s in text for s in ("Connection closed", "Connection reset", "gloo", "NCCL", "Broken pipe", "timed out")):
        return None
    return (f"rank {WORLD.rank}: lost contact with the other ranks ({text[:120]}); the job stops. The last complete "
            f"checkpoint is intact: continue with torchrun ... -m stagewise resume {WORLD.run_dir}")


# ---------------------------------------------------------------------------------------------- the model


class _Dispatch(nn.Module):
    """What DDP wraps: forward(method, ...) calls that method of the model, so that objectives calling
    model.token_logprobs(...) go through DDP's forward (which prepares its gradient reduction)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.model, method)(*args, **kwargs)


class DDPModel:
    """The model as objectives see it under DDP: its compute methods run through DDP, every other
    attribute is the model's own."""

    ROUTED = ("forward", "token_logprobs", "hidden_states")

    def __init__(self, model: nn.Module, ddp):
        # .module is what objectives.base.token_model unwraps to find the Transformer (as for DDP itself)
        self.__dict__.update(_model=model, _ddp=ddp, module=model)

    def __call__(self, *args, **kwargs):
        return self._ddp("forward", *args, **kwargs)

    def __getattr__(self, name):
        if name in self.ROUTED:
            return lambda *a, **k: self._ddp(name, *a, **k)
        return getattr(self._model, name)


def mixed_precision_policy(mode: str):
    """FSDP2's MixedPrecisionPolicy for a precision mode (SHARDED_PRECISIONS): bf16-mixed all-gathers the
    weights in bf16 (what autocast would round them to) and reduce-scatters the gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mode == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def parallelize(model: nn.Module, world: World, precision_mode: str):
    """Apply the world's strategy to `model` in place (fully_shard) or beside it (DDP); returns what the
    step calls (the model itself, or a DDPModel)."""
    if world.strategy == "none":
        return model
    if world.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [model.tok_embeddings.weight.device.index] if model.tok_embeddings.weight.is_cuda else None
        # Buffers (RoPE tables) are derived from the config: identical everywhere, never broadcast.
        ddp = DDP(_Dispatch(model), device_ids=device_ids, forward_sync_buffers=False)
        return DDPModel(model, ddp)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    policy = mixed_precision_policy(precision_mode)
    reshard = world.pcfg.reshard_after_forward
    for block in model.layers:
        fully_shard(block, mesh=world.mesh, mp_policy=policy, reshard_after_forward=reshard)
    # The root holds the embeddings, the final norm and the head; it stays gathered after the forward
    # (its weights are needed again first in the backward).
    fully_shard(model, mesh=world.mesh, mp_policy=policy, reshard_after_forward=False)
    for method in DDPModel.ROUTED[1:]:
        register_fsdp_forward_method(model, method)
    return model


class StepSync:
    """What train_step needs of the world: the gradient scale, when to synchronise gradients during
    accumulation, and the one all-reduce of the step's sums."""

    def __init__(self, world: World, model):
        self.world, self.model = world, model
        self.scale = float(world.size)  # DDP and FSDP2 average gradients over ranks: undo it

    def micro(self, last: bool):
        """Context for one micro-batch's forward and backward: gradients synchronise on the last only."""
        if isinstance(self.model, DDPModel):
            return contextlib.nullcontext() if last else self.model._ddp.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        device = self.world.comm_device
        out = values.to(device)
        dist.all_reduce(out)
        return out.to(values.device)


def full_state_dict(model: nn.Module, world: World) -> dict | None:
    """The unsharded model state on rank 0 (a collective under fsdp2/hsdp); None on other ranks."""
    if world.strategy not in ("fsdp2", "hsdp"):
        return model.state_dict() if world.main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if world.main else None
