"""The HTTP API: current usage, health, webhooks, rules, Prometheus; see docs/parts/api.md."""
