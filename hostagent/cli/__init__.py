"""The `hostagent` command line: run, dump, check-config, check-rules, outbox, sink check."""
