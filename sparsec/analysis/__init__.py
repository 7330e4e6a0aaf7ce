"""The analysis layer: cost model, knapsack, graph runner, linear sensitivity and the shipped
measurements — what passes measure and predict, with no pass of its own.

It sits between the IR (plan, patterns, errors, config) and the passes: it may import
those and torch, never ``sparsec.passes``, ``codegen``, ``runtime`` or the tools.
"""
