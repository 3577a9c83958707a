"""Continual-learning benchmark: every strategy on the same domains, seeds and budget."""
