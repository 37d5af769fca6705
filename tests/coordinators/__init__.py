"""Test coordinators: each dialect a real FastAPI app on 127.0.0.1, SQLite-backed, with faults."""
