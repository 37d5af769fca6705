"""The API's routers, one module per concern; each route is a few lines over the library."""
