"""Model specs and loading: the built-in zoo, shipped weights, students, int8 and the bundled digits data."""
