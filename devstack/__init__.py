"""The local platform: processes, stores, Envoy, the dev chain and CA (`python -m devstack`).

Importing it turns gRPC's fork support off for this process unless the environment says otherwise. With it on,
grpcio 1.81+ restarts its poller in the child that `subprocess` forks for every process started here (the
helper passes a preexec_fn for PDEATHSIG, so Python forks rather than vforks), and that child can abort on
EBADF before it execs (grpc/grpc#43055). Nothing here forks without exec. gRPC reads the setting when it is
imported, so entry points import this package first (tests/conftest.py, bench/__init__.py); the Makefile
exports it too.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
