"""Device profiles: one TOML file per deployment target, read by `awq_edge.engine.devices`."""
