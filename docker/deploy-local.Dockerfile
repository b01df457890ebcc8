# The deploy image of `stacks:` for tests on machines that cannot pull: git, git-crypt,
# ssh, the docker CLI, busybox as /bin/sh (git runs git-crypt's filters through a shell)
# and the host-compiled drover, each with the libraries `ldd` lists, FROM scratch.
# scripts/test prepares the context (rootfs/...) and builds it with the legacy builder.
# The release image is the `deploy` target of the project Dockerfile.
FROM scratch
COPY rootfs/ /
ENV HOME=/tmp PATH=/usr/local/bin:/usr/bin:/bin:/usr/lib/git-core
ENTRYPOINT ["/usr/local/bin/drover"]
CMD ["stack-deploy"]
