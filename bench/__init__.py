"""Benchmarks (`make bench`); figures go to bench/RESULTS.md and bench/results/."""

import devstack  # noqa: F401  (first: it turns gRPC's fork support off before anything imports grpc)
