"""Offline batch inference on Ray Data with the same model classes and pipeline spec (issue 3).

``python -m batch run`` scores files; ``python -m batch parity`` checks the batch path against the
running Serve app. :mod:`batch.plan` turns the spec into stages, :mod:`batch.adapter` is the actor
class each stage runs, :mod:`batch.inputs` reads and sorts rows, :mod:`batch.pipeline` runs jobs.
"""
