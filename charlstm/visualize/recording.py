"""Run a model over a text as one stream and record h, C, every gate and the predictions per character."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import console
from ..model import CharModel
from .quantities import quantities_for, quantity_notes

DEFAULT_TOP_K = 5          # predictions shown on hover
CHUNK = 256                # characters per forward call (state carried between calls)


@dataclass
class Recording:
    """Everything the model did over one text, one row per character."""

    text: str                        # the characters read (T of them)
    vocab: list[str]                 # token id -> character
    variant: str
    quantities: tuple[str, ...]      # recorded per layer, e.g. ('h', 'c', 'f', 'i', 'o')
    layers: list[dict[str, Tensor]]  # per layer: quantity -> (T, H) float32, on the CPU
    p_next: Tensor                   # (T,) probability of the actual next character; NaN at the last step
    top_ids: Tensor                  # (T, K) the K most probable next characters, best first
    top_probs: Tensor                # (T, K)
    notes: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden(self) -> int:
        return self.layers[0]["h"].shape[1]

    def bits_per_char(self) -> float:
        """Mean -log2 p(actual next character) over the text (T - 1 predictions)."""
        p = self.p_next[:-1].double()
        if p.numel() == 0:
            return float("nan")
        return float(-(p.clamp_min(1e-30).log2()).mean())

    def unit_matrix(self, quantities: tuple[str, ...] | None = None) -> tuple[Tensor, list[tuple[int, str, int]]]:
        """Every unit's trace side by side: (T, N) and the (layer, quantity, unit) of each column."""
        quantities = quantities or self.quantities
        cols, index = [], []
        for k, layer in enumerate(self.layers):
            for q in quantities:
                if q in layer:
                    cols.append(layer[q])
                    index.extend((k, q, u) for u in range(layer[q].shape[1]))
        return torch.cat(cols, dim=1), index


def gate_model(model):
    """A model whose forward exposes its gates: the model itself, or (cuDNN backend) its custom
    twin with the same weights."""
    if model.cfg.backend != "cudnn":
        return model
    twin = CharModel(dataclasses.replace(model.cfg, backend="custom"))
    twin.load_state_dict(model.state_dict())  # converts the cuDNN layout
    w = model.head.weight
    return twin.to(device=w.device, dtype=w.dtype).eval()


def record(model, ids: Tensor, vocab: list[str], *, top_k: int = DEFAULT_TOP_K, progress: bool = False) -> Recording:
    """Run ``model`` over the token ids (T,) as one stream with the state carried, and record
    h, C, every gate and the next-character predictions at every step.

    On the CPU this runs on one thread (one stream is one small product per step,
    which extra threads only slow down; see docs/visualize.md)."""
    threads = torch.get_num_threads()
    on_cpu = model.head.weight.device.type == "cpu"
    if on_cpu:
        torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return _record(model, ids, vocab, top_k=top_k, progress=progress)
    finally:
        if on_cpu:
            torch.set_num_threads(threads)


def _record(model, ids: Tensor, vocab: list[str], *, top_k: int, progress: bool) -> Recording:
    model.eval()
    twin = gate_model(model)
    cfg = model.cfg
    ids = ids.to(device=model.head.weight.device, dtype=torch.long)
    logits, twin_logits, per_layer = _run_chunks(model, twin, ids, progress)
    layers = [_layer_traces(steps, cfg.variant) for steps in per_layer]
    p_next, top_ids, top_probs = _predictions(logits, ids, top_k)
    notes = quantity_notes(cfg)
    if twin is not model:
        notes.extend(_twin_notes(logits, twin_logits))
    text = "".join(vocab[i] for i in ids.tolist())
    return Recording(text=text, vocab=list(vocab), variant=cfg.variant, quantities=quantities_for(cfg.variant),
                     layers=layers, p_next=p_next, top_ids=top_ids, top_probs=top_probs, notes=notes)


def _run_chunks(model, twin, ids: Tensor, progress: bool) -> tuple[Tensor, Tensor, list[list[dict[str, Tensor]]]]:
    """The model's logits (T, V), the twin's (T, V), and per layer the twin's gates of each chunk
    ({name: (t, H)} on the CPU); the state is carried from chunk to chunk."""
    T = ids.numel()
    chunks = [ids[s:s + CHUNK] for s in range(0, T, CHUNK)]
    bar = None
    if progress and len(chunks) > 1:
        bar = console.progress(T, desc="recording", unit="chars")
    own_state = gate_state = None
    logits_all, twin_logits_all, per_layer = [], [], [[] for _ in range(model.cfg.layers)]
    for chunk in chunks:
        x = chunk.view(-1, 1)  # (t, 1)
        logits, own_state = model(x, own_state)  # the model's own forward: (t, 1, V)
        twin_logits, gate_state, gates = twin.forward_with_gates(x, gate_state)
        logits_all.append(logits[:, 0].float().cpu())
        twin_logits_all.append(twin_logits[:, 0].float().cpu())
        for k, g in enumerate(gates):
            per_layer[k].append({name: t[:, 0].float().cpu() for name, t in g.items()})  # each (t, H)
        if bar is not None:
            bar.update(chunk.numel())
    if bar is not None:
        bar.close()
    return torch.cat(logits_all), torch.cat(twin_logits_all), per_layer


def _layer_traces(steps: list[dict[str, Tensor]], variant: str) -> dict[str, Tensor]:
    """One layer's chunks joined: quantity -> (T, H), only the quantities the variant records."""
    g = {name: torch.cat([s[name] for s in steps]) for name in steps[0]}  # each (T, H)
    if variant == "coupled":
        g["i"] = 1.0 - g["f"]  # no input gate of its own: the coupled cell takes 1 - f
    return {q: g[q].contiguous() for q in quantities_for(variant)}


def _predictions(logits: Tensor, ids: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """p(actual next character) (T,) with NaN at the last step, and the top-k ids and probabilities (T, K)."""
    T = ids.numel()
    probs = torch.softmax(logits.double(), dim=-1).float()  # (T, V)
    k = min(top_k, probs.shape[1])
    top_probs, top_ids = probs.topk(k, dim=-1)  # (T, K)
    p_next = torch.full((T,), float("nan"))
    if T > 1:
        nxt = ids[1:].cpu()
        p_next[:-1] = probs[torch.arange(T - 1), nxt]
    return p_next, top_ids, top_probs


def _twin_notes(logits: Tensor, twin_logits: Tensor) -> list[str]:
    """The notes of a recording made through the custom twin, with a warning where the two disagree."""
    notes = ["recorded through the custom cells loaded with the cuDNN module's weights"]
    gap = (twin_logits - logits).abs().max().item() if logits.numel() else 0.0
    if gap > 1e-3 * max(1.0, logits.abs().max().item()):
        notes.append(f"warning: the custom twin's logits differ from the model's by up to {gap:.2g}")
    return notes
