"""The coordinator: the client API, the speculative session loop and the Ray control plane."""
