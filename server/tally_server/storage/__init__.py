"""Storage: SQLAlchemy Core over SQLite (aiosqlite) or PostgreSQL (asyncpg).

Returns domain records; knows nothing of protobuf or gRPC.
"""
