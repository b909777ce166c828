"""The `splitinfer demo`: a cloud worker and an edge agent over a changing, failing link."""
