"""The HTTP front end: ``create_app(settings, engine_factory)`` builds the FastAPI app."""

from server.api.app import create_app

__all__ = ["create_app"]
