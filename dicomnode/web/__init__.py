"""The node's status page and REST API (stdlib HTTP server), with /metrics."""
