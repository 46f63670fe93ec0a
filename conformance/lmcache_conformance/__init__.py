"""The reusable StorageBackend conformance suite (see ``suite.BackendTests``)."""
