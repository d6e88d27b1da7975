"""The state store: ONE SQLite file with baselines, the outbox, alert state and webhooks."""
