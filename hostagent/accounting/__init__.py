"""Accounting (pure): domain XML → identity; readings → samples → usage with carry → events."""
