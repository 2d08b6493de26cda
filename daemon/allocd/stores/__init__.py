"""Durable state: journal stores (allocd.journal.JournalStore) and dead-letter sinks
(stores.base.DeadLetters), for Kafka (`kafka.py`, the checkpoint and DLQ topics), for files (`files.py`, the
sidecar's spool directory) and in memory (`memory.py`, unit tests)."""
