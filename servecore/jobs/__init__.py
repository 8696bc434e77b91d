"""Asynchronous jobs: the durable job store, webhook delivery and the runners' autoscaling
policy."""
