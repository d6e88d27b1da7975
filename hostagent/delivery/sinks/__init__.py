"""Sinks: where outbox events go (Formation queue, JSONL file, webhooks)."""
