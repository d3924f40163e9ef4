"""The control plane: the protocol (the event schema), the event stream and its journal, index and
digest, the ZeroMQ server, endpoints and security. No mlx import. docs/ARCHITECTURE.md."""
