"""The web dashboard: static pages under ``/ui`` (app/ui/static) and the login that turns
an API key into a session cookie (routes.py, sessions.py)."""
