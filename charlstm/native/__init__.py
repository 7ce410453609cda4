"""Native kernels: C in charlstm/csrc, compiled once and called through ctypes (docs/performance.md).

``build`` compiles and loads the library, ``abi`` mirrors its structs and kinds, ``pack`` lays
weights out in the panels the kernels read, ``loops`` runs a layer's training time loops and
``step`` is the sampling step. Everything here is an optional speed-up: where the library cannot
be built, the torch code computes the same thing.
"""
