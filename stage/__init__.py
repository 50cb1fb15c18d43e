"""The whole deployment on one machine (``make stage``, ``python -m stage``): N model servers
(the project's TF Serving stand-in, each its own process), M gateways with the TF Serving
backend and ``round_robin`` over all model servers, nginx in front of the gateways (REST and
gRPC, configured from the k8s Ingress annotations) and Prometheus scraping every process with
deploy/prometheus.yml's jobs and deploy/alerts.yml. See :mod:`stage.cluster`."""
