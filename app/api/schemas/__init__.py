"""API schemas: request and response bodies of our HTTP endpoints."""
