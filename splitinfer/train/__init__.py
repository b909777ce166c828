"""Training: the digits teacher, distilled students, evaluation and their commands."""
