"""What `charlstm visualize` records for each cell variant (from the cell registry) and what it means."""

from __future__ import annotations

from ..registry import VARIANTS, gate_quantities, recorded

QUANTITY_HELP = {
    "h": "hidden state h_t (the layer's output)",
    "c": "cell state C_t",
    "f": "forget gate f_t",
    "i": "input gate i_t",
    "o": "output gate o_t",
    "z": "update gate z_t",
    "r": "reset gate r_t",
    "x_mod": "the mogrifier's modulated input x↑ (the lstm's input after the rounds)",
    "h_mod": "the mogrifier's modulated state h↑ (the lstm's h_{t-1} after the rounds)",
}
GATES = {variant: gate_quantities(variant) for variant in VARIANTS}   # the registry's, by variant


def quantities_for(variant: str) -> tuple[str, ...]:
    """The quantities recorded for a variant, in display order (the cell registry's `recorded`)."""
    return recorded(variant)


def quantity_notes(cfg) -> list[str]:
    """What a quantity means for this particular variant, where it is not the obvious."""
    notes = []
    if cfg.variant == "coupled":
        notes.append("coupled has no input gate of its own: its i is 1 - f, shown for comparison with the LSTM")
    if cfg.variant == "gru":
        if cfg.gru_form == "cudnn":
            notes.append("gru (cudnn form): z is the share of the old state kept, h = (1 - z) * n + z * h_prev")
        else:
            notes.append("gru (cho form): z is the share of the new candidate taken, h = (1 - z) * h_prev + z * n")
    if cfg.variant == "mogrifier":
        notes.append(f"mogrifier ({cfg.mogrify_rounds} rounds): x_mod and h_mod are x_t and h_t-1 after the rounds; "
                     "x_mod of layer 0 has one unit per embedding dimension")
    if cfg.variant == "rnn":
        notes.append("rnn has no gates: only h is recorded")
    return notes
