# Before any route is declared: bounds every `{name:int}` path parameter to a 64-bit row id.
from app.web import ids  # noqa: F401
