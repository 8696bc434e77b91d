"""Offline batch inference on Ray Data with the same model classes and pipeline spec (issue 3)."""
