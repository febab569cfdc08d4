"""Redemption gateway."""
