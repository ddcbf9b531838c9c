"""Rendering results: Rich tables, JSON, plots. Library code returns dataclasses; only this prints."""
