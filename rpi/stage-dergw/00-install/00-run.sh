#!/bin/bash -e
# pi-gen (host side): copy the gateway's arm64 Debian package into the image and install it.
# The package carries all product logic (units, user, config); this stage only adds OS policy.
# DERGW_DEB: path of dergw_<version>_arm64.deb (packaging/build-deb --arch arm64); default: the
# one .deb in this directory's files/.
deb="${DERGW_DEB:-$(find "$(dirname "$0")/files" -maxdepth 1 -name 'dergw_*_arm64.deb' | sort | tail -n 1)}"
if [ -z "${deb}" ] || [ ! -f "${deb}" ]; then
    echo "stage-dergw: no dergw_*_arm64.deb: build it with packaging/build-deb --arch arm64 and set DERGW_DEB" >&2
    exit 1
fi
install -m 0644 "${deb}" "${ROOTFS_DIR}/tmp/dergw.deb"
on_chroot <<'CHROOT'
set -e
apt-get install -y --no-install-recommends /tmp/dergw.deb
rm -f /tmp/dergw.deb
systemctl enable dergw-gateway.service dergw-enroll.service
# First-boot enrollment template on the boot partition (FAT: editable from any computer).
install -D -m 0644 /usr/share/doc/dergw/enroll.conf.example /boot/firmware/dergw/enroll.conf.example
CHROOT
