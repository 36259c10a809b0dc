#!/usr/bin/env bash
# A Python base image for docker/Dockerfile.cpu made from Debian packages alone,
# for machines that reach a Debian mirror and PyPI but no image registry:
# debootstrap a minimal Debian, add Python, import the tree as an image.
#
#   docker/debian_base.sh TAG [ENGINE]        (as root; ENGINE: podman or docker)
#   docker build -f docker/Dockerfile.cpu --build-arg BASE_IMAGE=TAG ...
#
# The image: Debian $SUITE (default bookworm, minbase) with python3,
# python3-dev (DeepSpeed's JIT ops need the headers), python3-venv and
# ca-certificates, and a virtual environment at /opt/venv first on PATH, so
# that `python` and `pip` behave as in the official python image (Debian's
# own Python refuses pip installs outside one, PEP 668). The build host's CA
# bundle replaces Debian's: pip in the image trusts what the host trusts
# (a TLS-inspecting proxy's CA, say).
set -euo pipefail

TAG="${1:?usage: debian_base.sh TAG [podman|docker]}"
ENGINE="${2:-podman}"
SUITE="${SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

rootfs="$(mktemp -d)"
cleanup() {
    # debootstrap mounts /proc and /sys inside while it works: never delete through a mount
    findmnt -rn -o TARGET | grep -F "${rootfs}/" | sort -r | xargs -r umount -l || true
    rm -rf --one-file-system "${rootfs}"
}
trap cleanup EXIT

debootstrap --variant=minbase --include=python3,python3-dev,python3-venv,ca-certificates \
    "${SUITE}" "${rootfs}" "${MIRROR}"
chroot "${rootfs}" python3 -m venv /opt/venv
cp /etc/ssl/certs/ca-certificates.crt "${rootfs}/etc/ssl/certs/ca-certificates.crt"
rm -rf "${rootfs}"/var/cache/apt/archives/*.deb "${rootfs}"/var/lib/apt/lists/*
tar -C "${rootfs}" -c . | "${ENGINE}" import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python"]' - "${TAG}"
