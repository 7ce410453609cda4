"""charlstm: character-level language models with LSTM-family cells."""

import warnings

__version__ = "0.1.0"

# torch warns on import when NumPy is absent; charlstm never needs NumPy, so a
# plain install (torch, typer, rich, tqdm, safetensors) must not print it.
warnings.filterwarnings("ignore", message=r"Failed to initialize NumPy")
