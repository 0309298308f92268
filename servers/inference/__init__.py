"""The inference service (far.inference.v1): paid, queued, cancellable, resumable token streaming from Triton."""
