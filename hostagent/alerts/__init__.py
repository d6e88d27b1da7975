"""Alerts: threshold rules (both seed formats), the rule index, the alert state machine,
routing by channel and the rules file source."""
