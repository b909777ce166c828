"""The edge agent: runs the head, talks to a cloud worker, falls back locally."""
