"""The pipeline spec and how it runs: stage plans, groups and routes, the batch layout, devices and
the torch modules the stages load."""
