"""Card-secret inventory (卡密): SKUs, secrets from suppliers encrypted at rest, and orders that hold and take them -
atomically per SKU shard in Redis, with Postgres as the system of record."""
