"""Speculative decoding: proposers that draft tokens cheaply, and the verification that keeps
the target model's output distribution exactly (rejection.py)."""
