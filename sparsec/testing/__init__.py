"""Helpers for tests and examples: models whose attention patterns are known by construction."""
from sparsec.testing.planted import PlantedAttention, planted_attention_probs, planted_llama, planted_llama_inputs

__all__ = ["PlantedAttention", "planted_attention_probs", "planted_llama", "planted_llama_inputs"]
