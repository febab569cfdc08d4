"""Campaigns as brands run them: their rules and how they are published to Redis, budgets and their shares,
reversals, and issuance of codes (generated or imported) at scale."""
