"""HTTP server: an AUTOMATIC1111-compatible API and a web page (``ldmkit serve``; needs ``ldmkit[server]``).

``from ldmkit.server.app import create_app`` builds the FastAPI app.
"""
