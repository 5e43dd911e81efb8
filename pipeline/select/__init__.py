"""The select stage: rules, deduplication and blocklists into the decisions table."""
