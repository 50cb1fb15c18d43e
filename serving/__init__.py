"""The gateway: one protocol-independent core with thin REST and gRPC adapters.

    request -> core.Classifier (validate -> preprocess -> batcher -> backend -> postprocess)
    REST (serving.rest, FastAPI) and gRPC (serving.grpc_api) only translate.
"""
