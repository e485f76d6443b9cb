"""Routers, one per resource; each route parses input, calls one service method, maps."""
