"""Everything gRPC that the exporter, controller and client share: channels (TLS, trust,
options, credentials), value mapping and router framing."""
