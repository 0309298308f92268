"""The GPU node registry (far.gpu.v1): registration, liveness from telemetry, model placement, telemetry history."""
