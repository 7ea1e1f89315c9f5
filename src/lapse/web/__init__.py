"""The gateway on the wire: forward-auth, proxy mode, login and the session API."""

from .app import Gateway, login_url, safe_next

__all__ = ["Gateway", "login_url", "safe_next"]
