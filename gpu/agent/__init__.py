"""The FAR node agent: registers a GPU node with the gpu service, streams its telemetry, applies model placement.

Run it as `python -m gpu.agent` (configuration in `gpu.agent.config`).
"""

AGENT_VERSION = "0.1.0"
