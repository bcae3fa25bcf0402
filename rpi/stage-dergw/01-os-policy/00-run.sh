#!/bin/bash -e
# pi-gen (host side): OS policy for a field appliance on an SD card (rpi/README.md).
files="$(dirname "$0")/files"

# Hardware watchdog: PID 1 feeds bcm2835_wdt; a hung kernel or systemd reboots the board.
install -D -m 0644 "${files}/dergw-watchdog.conf" "${ROOTFS_DIR}/etc/systemd/system.conf.d/dergw-watchdog.conf"
# Journal: bounded, so logs cannot fill the card.
install -D -m 0644 "${files}/dergw-journald.conf" "${ROOTFS_DIR}/etc/systemd/journald.conf.d/dergw.conf"

# noatime on the root and boot file systems: no write for every read.
sed -i -E '/^[^#].*[[:space:]]\/(boot\/firmware)?[[:space:]]/ { /noatime/! s/(defaults)/\1,noatime/ }' "${ROOTFS_DIR}/etc/fstab"

on_chroot <<'CHROOT'
set -e
# No swap on SD: it wears the card and hides memory leaks (MemoryMax= restarts the gateway).
if dpkg -s dphys-swapfile >/dev/null 2>&1; then
    systemctl disable dphys-swapfile.service || true
    apt-get purge -y dphys-swapfile
fi
systemctl mask swap.target
CHROOT
