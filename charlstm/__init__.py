"""charlstm: character-level language models with LSTM-family cells."""

__version__ = "0.1.0"
