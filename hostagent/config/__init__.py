"""Configuration: the TOML file → typed, validated, frozen `Config` (schema, sinks, loading)."""
