"""The adapter-fusion gRPC server: app (create_server/serve), service, store, error table."""
