"""gRPC: the server and its services."""
