"""Owners: who pays for an instance (owner index, account-service client, request signing)."""
