from homering.api.openai import create_app, serve  # noqa: F401  (homering/api/app.py is being written)
