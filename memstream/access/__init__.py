"""Access to the read API: tenants own sessions and long-term subjects, credentials are granted
a tenant's sessions (:mod:`.grants`, pure), stored hashed in a registry of write-once objects
(:mod:`.registry`) that `memstream tenants` and `memstream credentials` write and
`memstream serve` reads."""
