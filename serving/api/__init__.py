"""Protocol adapters over serving.core: REST (FastAPI) and gRPC."""
