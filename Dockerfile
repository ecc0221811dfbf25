# syntax=docker/dockerfile:1
# Builds the release binary and ships it on a distroless base (glibc, CA
# certificates, no shell, no package manager).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY benches benches
COPY tests tests
RUN cargo build --release --locked --bin coffer

FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/coffer /usr/local/bin/coffer
# Root by default: the driver's provider directory on the host is root-owned.
# See daemonset/README.md for the non-root mode.
ENTRYPOINT ["/usr/local/bin/coffer"]
CMD ["serve"]
