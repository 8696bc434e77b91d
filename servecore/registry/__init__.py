"""The MLflow model registry: resolving model URIs to local folders, and moving aliases."""
