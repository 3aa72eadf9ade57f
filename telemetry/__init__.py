"""Telemetry: event schema, emitter, stores and queries, export, statistics."""
