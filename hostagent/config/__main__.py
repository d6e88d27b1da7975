"""`python -m hostagent.config` prints the README's configuration table."""

from hostagent.config.load import reference_markdown

print(reference_markdown())
