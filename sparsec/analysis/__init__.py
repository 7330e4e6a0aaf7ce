"""The analysis layer: what passes measure on a captured graph, with no pass of its own.

It sits between the IR (plan, patterns, errors, config) and the passes: it may import
those and torch, never ``sparsec.passes``, ``codegen``, ``runtime`` or the tools.
"""
