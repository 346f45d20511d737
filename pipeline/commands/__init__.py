"""Commands that are not stages: audit, compare, batch predict, export."""
