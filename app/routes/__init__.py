"""One router per route group: recommend, feedback, admin (key-protected), ops (health and metrics), dashboard."""
from app.routes import admin, dashboard, feedback, ops, recommend

ROUTERS = (recommend.router, feedback.router, admin.router, ops.router, dashboard.router)
