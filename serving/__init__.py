"""The gateway: one protocol-independent core with thin REST and gRPC adapters.

    request -> core.Classifier (validate -> preprocess -> batcher -> backend -> postprocess)
    REST (serving.api.rest.app, FastAPI) and gRPC (serving.api.grpc.server) only translate.
"""
