"""Narrow experts from small open models: prep, train, eval, push."""
