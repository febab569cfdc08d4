"""The ledger: moving outbox events from Redis into Postgres, exactly once."""
