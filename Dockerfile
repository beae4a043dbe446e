# syntax=docker/dockerfile:1
# The deltasync server image: `docker build .` from a clean clone.
#
# Stage 1 builds the release binary (protobuf is compiled in-process by
# build.rs, so the builder needs nothing but Rust). Stage 2 is distroless
# `cc` (glibc, libgcc, CA certificates; no shell, no package manager) with
# the binary alone. The server runs as the numeric user 65532 and writes
# only to /data, so the pod can run with `readOnlyRootFilesystem: true`
# (helm/deltasync mounts a PersistentVolume there).

ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
# The registry and target caches survive between builds (BuildKit), so a
# source change does not rebuild the dependencies.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin deltasync \
 && install -D -m 0755 target/release/deltasync /out/usr/local/bin/deltasync \
 && install -d -m 0700 /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="deltasync" \
      org.opencontainers.image.description="gRPC service that keeps versioned JSON documents in sled and keeps other services in sync with them" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/deltasync/deltasync"
COPY --from=builder /out/usr/local/bin/deltasync /usr/local/bin/deltasync
# The only writable path: the store. Owned by the runtime user so that a
# plain `docker run` works too; in Kubernetes the volume's fsGroup does it.
COPY --from=builder --chown=65532:65532 /out/data /data
USER 65532:65532
ENV DELTASYNC_LISTEN=0.0.0.0:50051 \
    DELTASYNC_DATA_DIR=/data/store
EXPOSE 50051
VOLUME ["/data"]
ENTRYPOINT ["deltasync"]
