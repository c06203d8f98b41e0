"""Domain logic: rules of types, experiences, pricing, resolution and statistics.

Nothing in this package knows of gRPC or protobuf.
"""
