"""Record and message schemas: the one source of truth for the wire and storage formats."""
