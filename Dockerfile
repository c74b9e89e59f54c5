# ratekeeper: build with `docker build -t ratekeeper .`, run with
#   docker run --rm -p 8080:8080 -p 8081:8081 ratekeeper
# (HTTP API on 8080, gRPC rate limit services on 8081, the shipped limits, in-memory counters).
# Other limits: mount a file and name it, e.g.
#   docker run --rm -v "$PWD/my-limits.yaml:/app/limits/my-limits.yaml:ro" -p 8080:8080 -p 8081:8081 \
#     ratekeeper limits/my-limits.yaml memory

# ---- build ---------------------------------------------------------------------------------
FROM rust:1-slim-bookworm AS builder
WORKDIR /src

# Only what the build reads: the protobuf files are compiled by build.rs in pure Rust, so no
# protoc is needed; Redis TLS uses rustls, so no OpenSSL headers either.
# Cargo reads every target the manifest declares, so the benchmark comes along (it is not built).
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches

RUN cargo build --release --locked --bin ratekeeper \
    && cp target/release/ratekeeper /usr/local/bin/ratekeeper

# ---- run -----------------------------------------------------------------------------------
FROM debian:bookworm-slim

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin ratekeeper

COPY --from=builder /usr/local/bin/ratekeeper /usr/local/bin/ratekeeper
# limitador-operator runs its image as `limitador-server ARGS` (see README: Replacing Limitador
# under Kuadrant), so the same binary answers to that name too.
RUN ln -s ratekeeper /usr/local/bin/limitador-server
WORKDIR /app
COPY limits ./limits

USER ratekeeper
# 8080: HTTP API (-P / HTTP_API_PORT); 8081: gRPC rate limit services (-p / ENVOY_RLS_PORT).
EXPOSE 8080 8081

# SIGTERM (docker stop) makes ratekeeper stop accepting and finish in-flight calls.
ENTRYPOINT ["ratekeeper"]
CMD ["limits/llm-tiers.yaml", "memory"]
