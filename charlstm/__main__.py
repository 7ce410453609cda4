"""`python -m charlstm ...` runs the command line (torchrun -m charlstm train ... uses this)."""

from .cli import main

main()
