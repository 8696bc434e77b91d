"""Benchmarks: ``python -m bench`` (``make bench``) measures the served graph against its peers.

One run measures, on the same machine and the same texts:

* the plain model classes chained in-process at batch 32 (the compute ceiling),
* the ``intent`` application deployed from ``serve_config.yaml`` and called over real HTTP,
* two single-process FastAPI servers over the same models (unbatched and micro-batching),

then prints a markdown table with the ratios the serving targets are stated in, and writes the
numbers to ``bench/results/latest.json`` (plus a timestamped copy).

Modules: :mod:`bench.pipeline` chains the model classes in-process, :mod:`bench.loadgen` is the
HTTP load generator, :mod:`bench.peers` the FastAPI peer servers, :mod:`bench.served` the Ray Serve
lifecycle, :mod:`bench.report` the table and JSON, :mod:`bench.plot` the latency-against-throughput
PNG, :mod:`bench.run` the command line.
"""
