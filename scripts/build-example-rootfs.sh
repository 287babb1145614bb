#!/bin/sh
# Builds the root file system the examples' `runtime.image`
# (docker.io/library/busybox:1.36.1) resolves to, from Debian's busybox-static
# package: no container registry needed (Debian 12 ships busybox 1.35; the
# applets the examples use behave the same). Writes
# examples/images/docker.io_library_busybox_1.36.1.tar (or into $1).
set -eu
out="$(cd "$(dirname "$0")/.." && pwd)/examples/images"
out="${1:-$out}"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# A fresh machine may have no package lists yet: fetch them once and retry.
apt-get download busybox-static >/dev/null 2>&1 || {
    apt-get update -qq
    apt-get download busybox-static >/dev/null
}
dpkg-deb -x busybox-static_*.deb pkg
mkdir -p rootfs/bin rootfs/etc rootfs/tmp rootfs/workspace
cp pkg/bin/busybox rootfs/bin/busybox
for applet in $(rootfs/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "rootfs/bin/$applet"
done
echo 'nobody:x:65534:65534:nobody:/:/bin/false' > rootfs/etc/passwd
echo 'nogroup:x:65534:' > rootfs/etc/group
tar --owner=0 --group=0 --numeric-owner --sort=name --mtime=@0 -C rootfs -cf "$out/docker.io_library_busybox_1.36.1.tar" .
echo "wrote $out/docker.io_library_busybox_1.36.1.tar"
