"""Small shared helpers with no knowledge of models: percentiles, JSON output, child-process pipes."""
