#!/usr/bin/env bash
# Installs the system packages vmlend needs and starts libvirt without systemd. Idempotent; run as root.
set -euo pipefail

PKGS=(
  python3-venv python3-dev gcc pkg-config
  qemu-system-x86 qemu-utils
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-system libvirt-clients libvirt-dev
  busybox-static squashfs-tools erofs-utils cpio zstd xz-utils
  mmdebstrap gpg libdpkg-perl arch-test debian-archive-keyring
  tini zsh groff-base
)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-system.sh must run as root (try: sudo make setup-system)" >&2
  exit 1
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Without this group/mode libvirt re-probes QEMU on every call (~56 s each here).
if [ -e /dev/kvm ]; then
  chgrp kvm /dev/kvm 2>/dev/null || true
  chmod 0660 /dev/kvm 2>/dev/null || true
fi

if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  pgrep -x virtlogd >/dev/null || virtlogd -d
  # Without systemd, libvirtd's QEMU processes are orphans of PID 1, and a PID 1 that reaps
  # late (as in containers and micro-VMs) holds every VM's destroy 1.4-1.8 s (libvirt waits
  # for the pid to vanish): tini, a subreaper, reaps them at once (0.2 s per destroy here).
  if ! pgrep -x libvirtd >/dev/null; then
    setsid tini -s -- libvirtd </dev/null >>/var/log/vmlend-libvirtd.log 2>&1 &
  fi
  for _ in $(seq 1 120); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.5
  done
  virsh -c qemu:///system version >/dev/null || { echo "libvirtd did not come up" >&2; exit 1; }
fi
echo "system ready: $(virsh -c qemu:///system version | grep -m1 'Using library')"
