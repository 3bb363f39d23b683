"""Scoring: the metrics, ``wsiseg eval``, and the white/glass measures."""
