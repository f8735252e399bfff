"""Noise schedules, respacing, sampler coefficient tables and the stitch schedule (numpy only)."""
