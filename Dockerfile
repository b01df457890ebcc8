# syntax=docker/dockerfile:1
#
# drover release image: a static (musl) binary in an otherwise empty image (< 15 MB).
# Multi-arch with BuildKit/buildx; the build stage runs natively on the build machine and
# cross-compiles for the target platform:
#
#   docker buildx build --platform linux/amd64,linux/arm64,linux/arm/v7 -t drover:latest .
#
# Running it (deployed as a global Swarm service, see README):
#
#   docker service create --mode global --name drover \
#     --mount type=bind,src=/var/run/docker.sock,dst=/var/run/docker.sock \
#     --publish mode=host,target=9090,published=9090 drover:latest
#
# Socket permissions: drover talks to the Engine through /var/run/docker.sock, which is
# root:docker mode 0660 on the host. The image runs as root by default, which can open it.
# To run unprivileged, pick a uid and add the socket's group (numeric, as the image has no
# /etc/group): `--user 65534:$(stat -c %g /var/run/docker.sock)` (or `--group-add GID`).
# Anyone who can reach the socket controls the node: do not expose 9090 beyond the hooks
# you need. DOCKER_HOST=tcp://...:2376 with DOCKER_CERT_PATH works instead of the socket.
#
# Tests on machines that cannot pull base images use docker/runtime-local.Dockerfile.

ARG RUST_CROSS=ghcr.io/rust-cross/rust-musl-cross
# The docker CLI of the deploy image (FROM arguments must come before the first FROM).
ARG DOCKER_CLI=docker:28-cli

# One native build stage per target architecture; BuildKit builds only the one selected
# by TARGETARCH (TARGETVARIANT "v7" for arm).
FROM --platform=$BUILDPLATFORM ${RUST_CROSS}:x86_64-musl AS build-amd64
ENV RUST_TARGET=x86_64-unknown-linux-musl
FROM --platform=$BUILDPLATFORM ${RUST_CROSS}:aarch64-musl AS build-arm64
ENV RUST_TARGET=aarch64-unknown-linux-musl
FROM --platform=$BUILDPLATFORM ${RUST_CROSS}:armv7-musleabihf AS build-arm
ENV RUST_TARGET=armv7-unknown-linux-musleabihf

FROM build-${TARGETARCH} AS builder
ARG TARGETPLATFORM
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# include_str! embeds the built-in templates; benches/ is named by Cargo.toml's [[bench]].
COPY templates ./templates
COPY benches ./benches
RUN --mount=type=cache,target=/root/.cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,id=drover-target-${TARGETPLATFORM} \
    echo "building for ${TARGETPLATFORM} (${RUST_TARGET})" \
    && cargo build --release --locked --bin drover --target "${RUST_TARGET}" \
    && install -D -m 0755 "target/${RUST_TARGET}/release/drover" /out/drover \
    && mkdir -p /out/tmp /out/etc/ssl/certs && chmod 1777 /out/tmp \
    && { cp /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/ 2>/dev/null || true; }

# The deploy image of `stacks:` (docs/stacks.md): drover runs it as a one-off container
# with the Docker socket for each deploy of a stack from git. git, git-crypt and ssh from
# Debian, the docker CLI (`docker stack deploy` is the reference compose conversion) from
# the official CLI image, and drover itself for the deciding logic (`drover stack-deploy`).
#
#   docker buildx build --platform linux/amd64,linux/arm64,linux/arm/v7 --target deploy \
#     -t drover-deploy:latest .
FROM ${DOCKER_CLI} AS docker-cli
FROM debian:bookworm-slim AS deploy
RUN apt-get update \
    && apt-get install -y --no-install-recommends git git-crypt openssh-client ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=docker-cli /usr/local/bin/docker /usr/local/bin/docker
COPY --from=builder /out/drover /usr/local/bin/drover
ENV HOME=/tmp
ENTRYPOINT ["/usr/local/bin/drover"]
CMD ["stack-deploy"]

FROM scratch AS runtime
COPY --from=builder /out/ /
EXPOSE 9090
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD ["/drover", "healthcheck"]
ENTRYPOINT ["/drover"]
CMD ["run"]
