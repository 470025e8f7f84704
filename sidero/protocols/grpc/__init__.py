"""gRPC on the API port: the Agent API (spec §3.7) and the h2c/HTTP/1.1 port splitter (§3.1)."""
