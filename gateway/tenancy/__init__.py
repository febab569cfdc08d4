"""The tenant registry: brands, stores, terminals, API clients and their keys, risk policies (Postgres is the system
of record).

    model        the domain objects (plain frozen dataclasses) and errors
    api_keys     the key format `rgw_<env>_<key_id>_<secret>`: generate, parse, hash, verify, redact
    snapshot     `Registry`, the immutable in-memory view the hot path authenticates against (no I/O)
    loader       reads the registry, or what changed since a version, from Postgres in one consistent snapshot
    admin_tx     the shape of every change: one transaction that bumps the registry version and writes an audit row
    admin_store  the administration operations: one transaction each, validated, versioned and audited
    admin_rules  the rules administration input must meet (every bad field reported at once)
    admin_risk   risk policy documents per brand and campaign (validated by risk.policy), versioned like the rest
    lockouts     the risk engine's lockouts in Redis: list a brand's, lift one (audited)
    notify       announces a committed version on Redis (a version key and a pub/sub message)

No grpc or protobuf here: the gRPC layer translates to and from these objects.
"""
