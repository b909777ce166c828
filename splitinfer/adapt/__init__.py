"""Adapting the cut: the link estimator, the policies, reference profiles and the planner that assembles them."""
