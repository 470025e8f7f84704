"""The Agent API wire contract: agent.proto and its generated modules (scripts/gen-proto)."""
