"""Application builders: a pipeline spec in, a bound Serve application out."""
