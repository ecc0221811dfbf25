#!/usr/bin/env bash
# Builds coffer's container image without a container engine or a base
# image: the release binary, the shared libraries it links (ldd), and the
# CA bundle, in a FROM-scratch image made by buildah (Debian package), saved
# as an OCI archive. Nothing is downloaded but crates.
#
#   daemonset/image/build.sh [OUT.oci.tar] [TAG]
#   buildah push --storage-driver vfs coffer:TAG docker://ghcr.io/OWNER/coffer:TAG
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-target/coffer.oci.tar}
tag=${2:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)}
cargo build --release --locked --bin coffer
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
install -D -m 0755 target/release/coffer "$root/usr/local/bin/coffer"
# The loader and every library the binary links, at the paths it expects.
ldd target/release/coffer | awk '/=>/ {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
  [ -n "$lib" ] && install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
done
install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
# A self-check: the image's files alone run the binary.
chroot "$root" /usr/local/bin/coffer --version
export STORAGE_DRIVER=vfs
ctr=$(buildah from scratch)
trap 'rm -rf "$root"; buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah copy "$ctr" "$root" /
buildah config \
  --entrypoint '["/usr/local/bin/coffer"]' --cmd serve \
  --label org.opencontainers.image.title=coffer \
  --label org.opencontainers.image.version="$tag" \
  --label org.opencontainers.image.source=https://github.com/coffer-dev/coffer \
  "$ctr"
buildah commit "$ctr" "coffer:$tag"
buildah push "coffer:$tag" "oci-archive:$out:coffer:$tag"
echo "image coffer:$tag saved to $out"
