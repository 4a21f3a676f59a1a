"""Helpers for testing diffcore and its plugins: tiny checkpoints, weight perturbation, conformance checks."""
