"""HTTP transport: FastAPI app factory, routes, API schemas, auth, error mapping."""
