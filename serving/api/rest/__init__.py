"""REST: the FastAPI app (serving/api/rest/app.py) and the HTTP server protocol it runs on."""
