"""Developer tooling: throw-away redis-server / PostgreSQL processes for tests and `make run`."""
