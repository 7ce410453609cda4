"""Memory before allocating: estimates of what training and sampling need, what the machine has, and
one clear error when it cannot fit (instead of the kernel's OOM killer); allocation failures as one line.

The estimates count what grows with the settings (parameters, gradients and AdamW's two moments;
the activations kept for backpropagation; sampling's per-stream state, logits, noise and text) and
leave out what does not (torch itself, a few hundred MB). docs/sampling.md ("Inputs and memory")
gives the formulas and how they compare with measured peaks.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch

from .config import ModelConfig, TrainConfig
from .datacache import format_bytes
from .errors import CharlstmError
from .model import resolve_backend
from .registry import spec_for

FLOAT_BYTES = 4
STATE_COPIES = 6                 # weights, gradients, AdamW's two moments, a checkpoint's serialised copies
ACTIVATIONS_PER_UNIT = 12        # floats kept per hidden unit per step for backward (gates, cell, h, ...)
LOGIT_COPIES = 3                 # logits, log-softmax and their gradient, per target
SAMPLE_CHUNK = 32                # characters drawn per chunk while sampling (sample.CHUNK)
TEXT_BYTES_PER_CHAR = 6          # a generated character kept as Python text (pieces, then the joined str)
_OOM = re.compile(r"not enough memory|DefaultCPUAllocator|out of memory|can't allocate memory|"
                  r"Cannot allocate memory|std::bad_alloc", re.IGNORECASE)


def parameter_count(model_cfg: ModelConfig, vocab_size: int) -> int:
    """The number of parameters of the model a config builds (embedding, recurrent stack, head),
    counted without storage: the stack is built on the meta device (tests check it against
    ``build_model(cfg).num_parameters()``)."""
    cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size or model_cfg.vocab_size or 1)
    cfg = dataclasses.replace(cfg, backend=resolve_backend(cfg))
    spec = spec_for(cfg)
    V, E, H, L = cfg.vocab_size, cfg.embed, cfg.hidden, cfg.layers
    with torch.device("meta"):
        if cfg.backend == "cudnn":
            modules = [spec.cudnn(E, H, num_layers=L, bias=cfg.bias)]
        else:
            modules = [spec.make_cell(cfg, E if k == 0 else H) for k in range(L)]
    recurrent = sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
    return V * E + recurrent + H * V + V                      # embedding, stack, head (weight and bias)


def estimate_training_bytes(model_cfg: ModelConfig, train_cfg: TrainConfig, vocab_size: int) -> int:
    """Bytes a training run needs that grow with its settings: parameters with their gradients and
    AdamW moments, and the activations of one step of B x T characters."""
    params = parameter_count(model_cfg, vocab_size)
    T, B = train_cfg.seq_len, train_cfg.batch_size
    per_char = (model_cfg.layers * model_cfg.hidden * ACTIVATIONS_PER_UNIT + LOGIT_COPIES * vocab_size
                + 2 * model_cfg.embed)
    return FLOAT_BYTES * (STATE_COPIES * params + T * B * per_char)


def estimate_sampling_bytes(model_cfg: ModelConfig, num_samples: int, length: int, prime_chars: int = 0) -> int:
    """Bytes sampling ``num_samples`` streams of ``length`` characters needs beyond the model: per
    stream its state, logits, a chunk of noise, the prime's logits and the text kept until the end."""
    V, H, L = model_cfg.vocab_size, model_cfg.hidden, model_cfg.layers
    per_stream = FLOAT_BYTES * (4 * L * H + 3 * V + SAMPLE_CHUNK * V + prime_chars * V)
    return num_samples * (per_stream + TEXT_BYTES_PER_CHAR * (length + prime_chars))


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """What this process's cgroup still allows (v2, then v1), None without a limit."""
    limit = _read_int("/sys/fs/cgroup/memory.max")
    used = _read_int("/sys/fs/cgroup/memory.current")
    if limit is None:
        limit = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        used = _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes")
    if limit is None or limit >= 1 << 60:
        return None
    return max(0, limit - (used or 0))


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory this process can still allocate on ``device``: MemAvailable of /proc/meminfo (or the
    cgroup's remaining limit, when smaller) for the CPU; the free memory of a CUDA device. None when
    unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    figures = [x for x in (_meminfo_available(), _cgroup_available()) if x is not None]
    return min(figures) if figures else None


def check_fits(needed: int, what: str, how_to_fix: str, device: torch.device | str = "cpu") -> None:
    """CharlstmError with the figures when ``needed`` bytes exceed what ``device`` has available."""
    available = available_bytes(device)
    if available is None or needed <= available:
        return
    where = "GPU memory" if torch.device(device).type == "cuda" else "memory"
    raise CharlstmError(f"{what} needs about {format_bytes(needed)} but only {format_bytes(available)} of {where} "
                        f"is available; {how_to_fix}")


def check_training(model_cfg: ModelConfig, train_cfg: TrainConfig, vocab_size: int,
                   device: torch.device | str = "cpu") -> None:
    """Refuse, with the figures, a training run that cannot fit in memory (the trainer calls this
    before it builds the model)."""
    needed = estimate_training_bytes(model_cfg, train_cfg, vocab_size)
    check_fits(needed, f"training this model ({model_cfg.layers} x {model_cfg.hidden} {model_cfg.variant}, "
                       f"{parameter_count(model_cfg, vocab_size):,} parameters, batches of "
                       f"{train_cfg.batch_size} x {train_cfg.seq_len})",
               "use a smaller --hidden, --layers, --batch-size or --seq-len", device)


def out_of_memory_message(error: BaseException) -> str | None:
    """One line for an allocation failure (MemoryError, torch's 'not enough memory', CUDA out of
    memory); None for any other error."""
    if not isinstance(error, MemoryError) and not _OOM.search(str(error)):
        return None
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    first = re.sub(r"\s*\(.*?\)\s*$", "", first)[:200]
    return (f"out of memory: {first}; use smaller settings (--hidden, --layers, --batch-size, --seq-len, "
            f"--num-samples, --length) or free memory")
