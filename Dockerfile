# outrigger: the sidecar and the demo service, in one image.
#
#   docker build -t outrigger:latest .
#   docker run --rm outrigger:latest check-config /etc/outrigger/outrigger.toml
#   docker run --rm --entrypoint outrigger-demo outrigger:latest --help
#
# Needs a registry for the two base images. Without one (as on our CI machines), use
# scripts/offline-images.sh, which builds an equivalent outrigger:local from host-built
# binaries and a debootstrapped base.
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --- build ----------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
# etcd-client's build script compiles etcd's .proto files with protoc.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Download dependencies in their own layer, so editing the source reuses it. Cargo
# refuses a manifest whose targets are missing (default-run, [[test]]), so stub them;
# the real sources replace the stubs below.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src integration \
 && echo 'fn main() {}' >src/main.rs \
 && touch src/lib.rs integration/main.rs \
 && cargo fetch --locked
COPY . .
RUN cargo build --release --locked --bins

# --- runtime --------------------------------------------------------------------------
# Same Debian release as the builder, so the binaries find the glibc they were linked to.
FROM ${RUNTIME_IMAGE}
# ca-certificates: TLS to a registry (etcd/Consul over https). curl: health checks and
# debugging from inside the container.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 outrigger \
 && useradd --system --uid 10001 --gid outrigger --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin outrigger \
 && mkdir -p /certs && chown outrigger:outrigger /certs
# /certs: where `outrigger certs` writes in the compose mesh; owned by the
# runtime user so a fresh named volume mounted there is writable by it.
COPY --from=builder /src/target/release/outrigger /src/target/release/outrigger-demo /usr/local/bin/
USER outrigger
# admin, outbound, inbound (Istio's conventions; see DESIGN.md).
EXPOSE 15000 15001 15006
ENTRYPOINT ["outrigger"]
CMD ["--help"]
