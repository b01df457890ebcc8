# drover's runtime image for tests on machines that cannot pull (no base image needed):
# the host-compiled release binary plus the libraries `ldd` lists and the loader, FROM
# scratch. scripts/test prepares the context (rootfs/drover, rootfs/lib*/..., CA bundle)
# and builds it with the legacy builder:
#   DOCKER_BUILDKIT=0 docker build -f docker/runtime-local.Dockerfile -t IMAGE CONTEXT
# The release image for users is the project Dockerfile (static musl binary, multi-arch).
# It is a separate file because the legacy builder pulls every FROM of a multi-stage file,
# even for stages the requested target does not need.
#
# Socket permissions: as in the main Dockerfile, mount /var/run/docker.sock and run as
# root (the default here) or as a user in the socket's group (`--user 0:$(stat -c %g ...)`).
FROM scratch
COPY rootfs/ /
EXPOSE 9090
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD ["/drover", "healthcheck"]
ENTRYPOINT ["/drover"]
CMD ["run"]
