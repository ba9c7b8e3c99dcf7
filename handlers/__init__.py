"""Tornado request handlers, one module per area; `all_routes()` joins their route lists."""
