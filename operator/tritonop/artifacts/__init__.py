"""Preparing what a resource serves: exported encoders, corpus indexes, LLM weights."""
