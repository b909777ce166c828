"""Benchmarks that print JSON (`splitinfer bench ...`): codec, cloud worker, compression, confidence exit."""
