"""Network-condition simulations: traces, simulator, real link emulation."""
