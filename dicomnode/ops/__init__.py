"""Operations: Prometheus metrics and the audit trail, fed by the node's events."""
