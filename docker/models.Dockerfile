# The models image: the versions committed under models/ plus a seeding script, for
# the model repository volume in Kubernetes (k8s/base/models-seed-job.yaml).
#
#   docker build -f docker/models.Dockerfile -t classifier-models:0.1.0 .
#   docker run --rm -v classifier-models:/models classifier-models:0.1.0   # seeds a volume
#
# Seeding copies each <model>/<version>/ that the volume lacks (to a hidden temporary
# folder, then renamed into place) and never touches a version that is already there:
# versions trained in the cluster, or seeded before, are kept as they are.
# checkov:skip=CKV_DOCKER_2: a one-shot seeding container (a Job), no long-running process for a HEALTHCHECK to probe

FROM busybox:1.37.0

COPY models/ /seed/models/
COPY docker/models-seed.sh /usr/local/bin/seed-models

USER 10001:10001
ENTRYPOINT ["/bin/sh", "/usr/local/bin/seed-models"]
CMD ["/seed/models", "/models"]
