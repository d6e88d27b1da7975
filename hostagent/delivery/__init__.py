"""Delivery: the drain engine (breaker, retries, dead letters) and the sinks it drains to."""
