"""Monitoring: metrics, the prediction log and input drift, all plain Python."""
