"""The IR layer, the bottom of sparsec: the plan and its records, the custom ops with their
pure-torch reference, targets, tolerances, budgets, inputs, errors and switches. Together
with ``sparsec.patterns`` and ``sparsec.weights`` it imports nothing else of sparsec
(tests/test_layers.py checks the layers; docs/design.md states them)."""
