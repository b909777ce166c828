"""Reference profiles and plans (JSON data, one folder per model)."""
