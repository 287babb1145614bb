# The toolwarden image with a Docker engine. scripts/build-image.sh builds the same
# image (same binary flags, same file tree, user 65532) without one, as an OCI archive.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# A static binary: glibc linked with crt-static (the explicit --target keeps
# build scripts and proc macros dynamic). The CA bundle is the egress proxy's
# upstream trust roots.
RUN RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target x86_64-unknown-linux-gnu --bin toolwarden \
 && mkdir -p /out/etc /out/home /out/run /out/tmp /out/usr/local/bin \
 && chmod 1777 /out/tmp \
 && cp target/x86_64-unknown-linux-gnu/release/toolwarden /out/usr/local/bin/ \
 && printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > /out/etc/passwd \
 && printf 'root:x:0:\nnonroot:x:65532:\n' > /out/etc/group \
 && mkdir -p /out/etc/ssl/certs \
 && cp /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/

FROM scratch
COPY --from=build /out/ /
USER 65532:65532
ENV PATH=/usr/local/bin
LABEL org.opencontainers.image.title="toolwarden" \
      org.opencontainers.image.description="Kubernetes operator that makes the tools AI agents call safe to run in production" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/toolwarden"]
CMD ["--help"]
