"""The control plane: the protocol, the journal and its digest, the event stream, the ZeroMQ server, security."""
