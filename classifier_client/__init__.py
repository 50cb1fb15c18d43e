"""Client for the classifier gateway: gRPC (sync and async) and REST, and the ``classifier-client`` CLI.

Installable without TensorFlow or the gateway's server dependencies (``pip install '.[client]'``):
it needs grpcio and protobuf (httpx for REST). The protocol lives here only; the CLI uses it.

    from classifier_client import Client
    with Client("127.0.0.1:50051") as c:
        print(c.sentiment(["a great film"]).predictions[0].label)
"""

from classifier_client.errors import ClientError, RETRYABLE
from classifier_client.grpc_client import AsyncClient, Client, Options, StreamStats
from classifier_client.rest import AsyncRestClient, RestClient

__all__ = ["Client", "AsyncClient", "RestClient", "AsyncRestClient", "Options", "StreamStats", "ClientError", "RETRYABLE"]
