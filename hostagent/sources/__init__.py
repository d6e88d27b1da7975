"""Host sources: each reads one kind of thing from an injected root or connection."""
