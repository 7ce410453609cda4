"""Training on several processes and machines under torchrun: the process group, each process's
share of the B streams, and the collectives the Trainer uses (gather of the carried state, the
global mean loss, one decision to stop). See docs/distributed.md.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import ctypes
import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .errors import CharlstmError, UsageError
from .runtime import resolve_device

ENV_RANK, ENV_WORLD, ENV_LOCAL_RANK, ENV_LOCAL_WORLD = "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"
TIMEOUT_ENV = "CHARLSTM_DIST_TIMEOUT"   # seconds a process waits in a collective (rank 0 evaluating, saving)
DEFAULT_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class DistContext:
    """Who this process is among the processes of a run (one process: rank 0 of 1, no group)."""

    rank: int = 0                  # global rank, 0..world_size-1
    world_size: int = 1            # processes in the run, all hosts together
    local_rank: int = 0            # rank on this host (picks the GPU)
    local_world_size: int = 1      # processes on this host
    backend: str | None = None     # 'nccl' or 'gloo' once the process group is joined; None: single process

    @property
    def enabled(self) -> bool:
        """True when this process belongs to a process group (launched by torchrun)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that evaluates, samples, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0: the process that fills a host's corpus cache."""
        return self.local_rank == 0


SINGLE = DistContext()


def env_context(environ=None) -> DistContext | None:
    """The ranks torchrun put in the environment, or None when it did not launch this process.

    UsageError when the variables are present but inconsistent.
    """
    environ = os.environ if environ is None else environ
    if ENV_WORLD not in environ and ENV_RANK not in environ:
        return None
    try:
        world = int(environ[ENV_WORLD])
        rank = int(environ[ENV_RANK])
        local_rank = int(environ.get(ENV_LOCAL_RANK, rank))
        local_world = int(environ.get(ENV_LOCAL_WORLD, world))
    except (KeyError, ValueError) as e:
        raise UsageError(f"the torch.distributed environment is incomplete or not numbers ({e}); launch "
                         "charlstm train with torchrun, or unset RANK and WORLD_SIZE for a single process") from None
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise UsageError(f"inconsistent torch.distributed environment: RANK={rank}, WORLD_SIZE={world}, "
                         f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world}")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def timeout() -> datetime.timedelta:
    """How long a process waits in a collective before giving up (CHARLSTM_DIST_TIMEOUT seconds)."""
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    return datetime.timedelta(seconds=seconds)


def device_for(requested: str, ctx: DistContext | None) -> torch.device:
    """This process's device for ``--device``: as given for a single process (``ctx`` None); under
    torchrun, ``cuda`` (or ``auto`` with CUDA present) means GPU LOCAL_RANK of this host."""
    if ctx is not None and requested.startswith("cuda:"):
        raise UsageError(f"--device {requested} names one GPU, but under torchrun every process takes its own "
                         "(GPU LOCAL_RANK of its host); pass --device cuda or auto")
    device = resolve_device(requested)
    if device.type != "cuda" or ctx is None:
        return device
    count = torch.cuda.device_count()
    if ctx.local_rank >= count:
        raise UsageError(f"process {ctx.local_rank} on this host needs GPU {ctx.local_rank}, but only {count} "
                         f"are visible; start at most {count} processes per host (--nproc-per-node {count})")
    return torch.device("cuda", ctx.local_rank)


def setup(requested_device: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group when torchrun launched this process; return the context and the device.

    Without torchrun's variables: (SINGLE, the requested device), nothing joined.
    """
    ctx = env_context()
    if ctx is None:
        return SINGLE, device_for(requested_device, None)
    device = device_for(requested_device, ctx)
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_available():
        raise CharlstmError("this PyTorch build has no torch.distributed; run charlstm train without torchrun")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        try:
            dist.init_process_group(backend=backend, init_method="env://", rank=ctx.rank,
                                    world_size=ctx.world_size, timeout=timeout(), **kwargs)
        except (RuntimeError, ValueError) as e:
            raise CharlstmError(f"could not join the process group ({backend}, rank {ctx.rank} of {ctx.world_size}): "
                                f"{e}; check --master-addr/--master-port or --rdzv-endpoint and that every host "
                                "can reach it") from e
    return DistContext(rank=ctx.rank, world_size=ctx.world_size, local_rank=ctx.local_rank,
                       local_world_size=ctx.local_world_size, backend=backend), device


def shutdown() -> None:
    """Leave the process group, if this process joined one (after the last collective)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait until every process gets here (no-op for a single process)."""
    if ctx.enabled:
        dist.barrier()


@contextlib.contextmanager
def local_main_first(ctx: DistContext):
    """Run the block on each host's local rank 0 first, then on the others of that host.

    For work that fills a cache every process then reads (the corpus's token
    cache, a download): one process per host writes it, the others find it.
    Every process passes exactly one barrier.
    """
    if ctx.enabled and not ctx.is_local_main:
        dist.barrier()
    yield
    if ctx.enabled and ctx.is_local_main:
        dist.barrier()


def stream_range(batch_size: int, ctx: DistContext) -> range:
    """The contiguous streams of the global batch this process takes: B/W of them.

    UsageError when B is not a multiple of the number of processes.
    """
    if batch_size % ctx.world_size:
        raise UsageError(f"--batch-size {batch_size} cannot be split across {ctx.world_size} processes: "
                         f"give a multiple of {ctx.world_size} (the global batch is split evenly)")
    share = batch_size // ctx.world_size
    return range(ctx.rank * share, (ctx.rank + 1) * share)


# The Work of the last collectives, so that the gloo worker thread that ran one is never the one
# that frees its tensors: that needs the GIL, and a process whose interpreter is exiting at that
# moment aborts ("terminate called without an active exception"; gloo's threads outlive
# destroy_process_group). Freed here, they are freed by the main thread.
_RECENT_WORK: collections.deque = collections.deque(maxlen=16)


def _wait(work) -> None:
    """Wait for an asynchronous collective and keep its Work for a while (see _RECENT_WORK)."""
    work.wait()
    _RECENT_WORK.append(work)


def _comm_device(ctx: DistContext) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else torch.device("cpu")


def gather_streams(t: torch.Tensor, ctx: DistContext, dim: int = 1) -> torch.Tensor:
    """Every process's share of the streams joined along ``dim`` in rank order: (L, B/W, H) -> (L, B, H).

    A collective: every process must call it. Returns the tensor on its own device.
    """
    if not ctx.enabled:
        return t
    local = t.detach().contiguous().to(_comm_device(ctx))
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    _wait(dist.all_gather(parts, local, async_op=True))
    return torch.cat(parts, dim=dim).to(t.device)


def my_streams(t: torch.Tensor, batch_size: int, ctx: DistContext, dim: int = 1) -> torch.Tensor:
    """This process's share of a tensor laid out over the B global streams: (L, B, H) -> (L, B/W, H)."""
    if t.shape[dim] != batch_size:
        raise CharlstmError(f"the saved carried state has {t.shape[dim]} streams, "
                            f"this run has --batch-size {batch_size}")
    r = stream_range(batch_size, ctx)
    return t.narrow(dim, r.start, len(r))


def mean(value: torch.Tensor, ctx: DistContext) -> float:
    """The mean of a scalar over the processes (itself for a single process)."""
    if not ctx.enabled:
        return float(value.item())
    v = value.detach().reshape(1).to(_comm_device(ctx), torch.float64)
    _wait(dist.all_reduce(v, op=dist.ReduceOp.SUM, async_op=True))
    return float(v) / ctx.world_size


def agree(ctx: DistContext, *, stop: bool, elapsed: float) -> tuple[bool, float]:
    """One decision for all processes: stop if any was asked to (a signal), and the largest elapsed time.

    The budget, the learning rate schedule and the stop all follow these
    shared values, so no process takes a step the others do not.
    """
    if not ctx.enabled:
        return stop, elapsed
    v = torch.tensor([1.0 if stop else 0.0, elapsed], dtype=torch.float64, device=_comm_device(ctx))
    _wait(dist.all_reduce(v, op=dist.ReduceOp.MAX, async_op=True))
    return bool(v[0] > 0), float(v[1])


# Small Python values (paths, losses, RNG states) cross between processes as
# JSON, tensors inside them as base64 of their bytes. torch's own object
# collectives would pickle them and need NumPy, which charlstm does not depend on.

def _to_jsonable(obj):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())
        return {"__tensor__": base64.b64encode(raw).decode("ascii"),
                "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if isinstance(obj, Path):
        return {"__path__": str(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_jsonable(v) for v in obj]}
    if isinstance(obj, list):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    return obj


def _from_jsonable(obj):
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        raw = bytearray(base64.b64decode(obj["__tensor__"]))
        dtype = getattr(torch, obj["dtype"])
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return flat.reshape(obj["shape"]).clone()
    if "__path__" in obj:
        return Path(obj["__path__"])
    if "__tuple__" in obj:
        return tuple(_from_jsonable(v) for v in obj["__tuple__"])
    return {k: _from_jsonable(v) for k, v in obj.items()}


def _encode(obj) -> torch.Tensor:
    data = json.dumps(_to_jsonable(obj)).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _decode(t: torch.Tensor):
    return _from_jsonable(json.loads(bytes(t.cpu().tolist()).decode("utf-8")))


def _wire_device(ctx: DistContext) -> torch.device:
    """Where collective buffers live: the process's GPU under nccl, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else torch.device("cpu")


def gather_objects(obj, ctx: DistContext) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process (a collective).

    Objects are JSON-able values, paths, tuples and tensors.
    """
    if not ctx.enabled:
        return [obj]
    device = _wire_device(ctx)
    data = _encode(obj).to(device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    _wait(dist.all_gather(sizes, size, async_op=True))
    longest = int(max(int(s.item()) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.zeros_like(padded) for _ in range(ctx.world_size)]
    _wait(dist.all_gather(parts, padded, async_op=True))
    return [_decode(p[: int(s.item())]) for p, s in zip(parts, sizes)]


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """Rank ``src``'s object on every process (a collective)."""
    if not ctx.enabled:
        return obj
    device = _wire_device(ctx)
    data = _encode(obj).to(device) if ctx.rank == src else None
    size = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64, device=device)
    _wait(dist.broadcast(size, src=src, async_op=True))
    if data is None:
        data = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    _wait(dist.broadcast(data, src=src, async_op=True))
    return _decode(data)


def wrap_model(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the model under torchrun, the model itself otherwise.

    DDP copies rank 0's weights to every process when it is built and averages
    gradients during backward.
    """
    if not ctx.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (for evaluation, sampling and checkpoints)."""
    return getattr(model, "module", model)


def on_main(fn, ctx: DistContext):
    """Run ``fn()`` on rank 0 only and give every process its result, or raise its error everywhere.

    For work one process must do while the others wait (choosing the run
    directory, evaluating, writing a checkpoint): the others wait in the
    broadcast, and a user's mistake found on rank 0 stops every process with
    the same message instead of leaving them waiting.
    """
    if not ctx.enabled:
        return fn()
    outcome, error = None, None
    if ctx.is_main:
        try:
            outcome = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - told to the other processes, then raised here
            error = e
            kind = "usage" if isinstance(e, UsageError) else "charlstm" if isinstance(e, CharlstmError) else "other"
            outcome = (kind, f"{e}" if kind != "other" else f"rank 0 failed: {type(e).__name__}: {e}")
    kind, value = broadcast_object(outcome, ctx)
    if error is not None:
        raise error
    if kind == "usage":
        raise UsageError(value)
    if kind in ("charlstm", "other"):
        raise CharlstmError(value)
    return value


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a process's own random draws (dropout masks): ``seed`` itself on rank 0."""
    return seed if rank == 0 else (seed * 1_000_003 + rank) % (2 ** 63)
