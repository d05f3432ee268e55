#!/usr/bin/env bash
# Prints the path of the protoc binary vendored by the protoc-bin-vendored
# crate (a dev-dependency), for dependencies whose build scripts need a protoc
# (the etcd-client crate used by tests). No system protoc is used.
set -uo pipefail
cd "$(dirname "$0")/.."
case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) plat=linux-x86_64 ;;
    Linux-aarch64) plat=linux-aarch_64 ;;
    Darwin-arm64) plat=macos-aarch_64 ;;
    Darwin-x86_64) plat=macos-x86_64 ;;
    *) exit 0 ;;
esac
dir="$(cargo metadata --format-version 1 2>/dev/null \
    | grep -o "\"manifest_path\":\"[^\"]*protoc-bin-vendored-${plat}-[0-9][^\"]*Cargo.toml\"" \
    | head -1 | sed 's/^"manifest_path":"//; s/Cargo.toml"$//')"
if [ -n "$dir" ] && [ -x "${dir}bin/protoc" ]; then
    printf '%sbin/protoc\n' "$dir"
fi
exit 0
