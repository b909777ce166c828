"""The cut math: graph capture, profiles and the profiler, the cost model, the partitioner, split and verify."""
