"""Matching and set-prediction losses."""
