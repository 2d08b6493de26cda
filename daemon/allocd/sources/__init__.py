"""Where events come from: Kafka, the sidecar's HTTP spool, NDJSON files."""
