"""perf_analyzer against the `reward` ensemble: input-data JSON and a runner writing CSV."""
