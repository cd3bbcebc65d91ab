#!/usr/bin/env bash
# Build a local Debian base image with Python 3.11 from a debootstrap rootfs (`docker import`).
#
# Why: the Dockerfiles default to the official python:3.11 slim image, which needs a registry. Where
# none is reachable (CI), this script makes an equivalent base from Debian's own packages:
# debootstrap --variant=minbase + python3 (3.11 on bookworm) + python3-venv + CA certificates.
#
# The rootfs tarball is cached under $CACHE_DIR, keyed by suite, mirror and package list, so only the
# first run pays for debootstrap (about 2 minutes); later runs only `docker import` it (seconds), or
# nothing at all when the engine already has the image. The image tag carries the same key, never
# `latest`. The last line on stdout is the image reference, for `--build-arg BASE_IMAGE=...`.
#
# Usage: docker/base/build-base.sh            (uses the docker CLI on PATH and its DOCKER_HOST)
# Env:   SUITE (bookworm), MIRROR (http://deb.debian.org/debian), CACHE_DIR
#        (${XDG_CACHE_HOME:-~/.cache}/inventory-monitor), DOCKER (docker), IMAGE_REPO (inventory-monitor/base)
set -euo pipefail

SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
CACHE_DIR="${CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/inventory-monitor}"
DOCKER="${DOCKER:-docker}"
IMAGE_REPO="${IMAGE_REPO:-inventory-monitor/base}"
# libstdc++6/libgomp1: onnxruntime's and grpcio's wheels link against them; minbase lacks them.
PACKAGES="python3,python3-venv,ca-certificates,libstdc++6,libgomp1"
# Bump when the recipe below changes, so a stale cached rootfs is never reused.
RECIPE=2

die() { echo "error: $*" >&2; exit 2; }

[ "$(id -u)" -eq 0 ] || die "debootstrap needs root (run as root or via sudo)"
command -v "$DOCKER" >/dev/null 2>&1 || die "'$DOCKER' not found: install the docker CLI (apt-get install docker.io)"

key="$(printf '%s\n' "$SUITE" "$MIRROR" "$PACKAGES" "$RECIPE" | sha256sum | cut -c1-12)"
tag="${IMAGE_REPO}:${SUITE}-py311-${key}"
tarball="${CACHE_DIR}/rootfs-${SUITE}-${key}.tar"

if "$DOCKER" image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag already present" >&2
  echo "$tag"
  exit 0
fi

if [ ! -s "$tarball" ]; then
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found: apt-get install debootstrap"
  mkdir -p "$CACHE_DIR"
  work="$(mktemp -d "${CACHE_DIR}/rootfs.XXXXXX")"
  # Unmount anything debootstrap left mounted and remove the half-built tree on any exit.
  cleanup() {
    for m in proc sys dev/pts dev; do umount -l "$work/root/$m" 2>/dev/null || true; done
    rm -rf "$work"
  }
  trap cleanup EXIT
  echo "debootstrap $SUITE from $MIRROR (packages: $PACKAGES) ..." >&2
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$work/root" "$MIRROR" >&2
  # Same trimming as the official slim images: no apt lists, caches, docs, man pages or locales.
  rm -rf "$work/root"/var/lib/apt/lists/* "$work/root"/var/cache/apt/* "$work/root"/var/cache/debconf/*-old \
    "$work/root"/usr/share/doc/* "$work/root"/usr/share/man/* "$work/root"/usr/share/info/* \
    "$work/root"/var/log/* "$work/root"/tmp/*
  find "$work/root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
  chroot "$work/root" python3 -c 'import ensurepip, ssl, venv' || die "python3 in the rootfs is incomplete"
  tar --numeric-owner --xattrs -C "$work/root" -cf "$work/rootfs.tar" .
  mv "$work/rootfs.tar" "$tarball"   # atomic: a cached tarball is always complete
  echo "cached rootfs $tarball ($(du -h "$tarball" | cut -f1))" >&2
fi

echo "docker import $tarball -> $tag" >&2
"$DOCKER" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  "$tarball" "$tag" >&2
echo "$tag"
