# The krun-only layer built offline from a binary already on this machine (the test command
# uses the debug build): golden-image/build-local.sh lays out rootfs/ (krun plus, for a
# glibc-linked binary, the loader and the libraries ldd names) and builds this with buildah.
FROM scratch
COPY rootfs/ /
USER 65532:65532
ENTRYPOINT ["/krun"]
