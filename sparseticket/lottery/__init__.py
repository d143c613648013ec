"""Lottery tickets: iterative magnitude pruning runner."""
