"""What runs on a GPU node: the Triton model repository (gpu/models), the tritonserver launcher and the node agent."""
