"""One router per route group: recommend, feedback, admin (key-protected), ops (health and metrics)."""
from app.routes import admin, feedback, ops, recommend

ROUTERS = (recommend.router, feedback.router, admin.router, ops.router)
