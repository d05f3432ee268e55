#!/usr/bin/env bash
# Builds the container image of Tardigrade from our own binary, pulling
# nothing: a root filesystem holding the binary (debug info stripped), the
# shared libraries `ldd` lists for it and the dynamic loader, a few files
# under /etc, and an empty /data (no VOLUME: Compose mounts one per node,
# and a declared VOLUME left anonymous volumes behind one-shot containers);
# brought in with `docker import`.
#
#   scripts/image.sh [BINARY] [TAG]     (defaults: the dev build, tardigrade:dev)
#
# The image has no shell: its health check is `tardigrade node health`.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-${CARGO_TARGET_DIR:-$HOME/.cache/tardigrade/target}/debug/tardigrade}
tag=${2:-tardigrade:dev}
[ -x "$bin" ] || { echo "image: no binary at $bin (run make build first)" >&2; exit 1; }
command -v docker >/dev/null || { echo "image: the docker command is missing" >&2; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/etc" "$root/data" "$root/tmp"
chmod 1777 "$root/tmp"
# The binary, without its debug line tables (they triple its size).
objcopy --strip-debug "$bin" "$root/tardigrade"
# Its shared libraries and the loader, at the paths the binary asks for.
ldd "$bin" | awk '/=> \// {print $3} /^[[:space:]]*\// {print $1}' | while read -r lib; do
    cp --parents -L "$lib" "$root/"
done
# Name lookup (service names inside Compose) and a user table for libc.
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
printf 'root:x:0:0:root:/data:/tardigrade\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"

version=$("$bin" --version | awk '{print $2}')
tar -C "$root" -c . | docker import \
    --change 'ENTRYPOINT ["/tardigrade"]' \
    --change 'CMD ["--help"]' \
    --change 'WORKDIR /data' \
    --change 'EXPOSE 2379 8080' \
    --change "ENV TARDIGRADE_VERSION=$version" \
    --message "tardigrade $version, built from $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    - "$tag" >/dev/null
size=$(docker image inspect --format '{{.Size}}' "$tag")
echo "image: built $tag (tardigrade $version, $((size / 1024 / 1024)) MiB, no base image)"
