#!/bin/sh
# Builds the mount namespace a containerd/runc pod with `hostUsers: false` gives its container,
# then runs "$@" in it as PID 1 with only the capabilities in $POD_CAPS (tests/sandbox_in_pod.rs).
# Runs as root of a fresh user namespace (65,536 ids mapped to an unused host range), already
# in fresh mount, pid (we are its PID 1), network, uts and ipc namespaces (and, on cgroup v2,
# a cgroup namespace rooted at the pod's cgroup): every mount inherited
# from the host is locked, as in a pod. Inputs: $SIM (a folder holding the runner's files,
# bound at /sim), $BIN (folder of the toolwarden binary, bound read-only at /toolwarden),
# optionally $WRAP_DIR (bound read-only at /wrap) and $WRAP (a command put before "$@").
set -eu
# The pod's network namespace has lo up (the runtime's doing).
busybox ip link set lo up
R="$SIM/root"
mkdir -p "$R"
mount -t tmpfs -o mode=755 tmpfs "$R"
cd "$R"
mkdir -p usr etc proc sys dev tmp run sim toolwarden oldroot
ln -s usr/bin bin; ln -s usr/lib lib; ln -s usr/lib64 lib64; ln -s usr/sbin sbin
# The image's files (the runner binary, its libraries, setpriv), read-only.
for d in usr etc; do mount --rbind "/$d" "$d"; mount -o remount,bind,ro "$d"; done
mount --bind "$BIN" toolwarden; mount -o remount,bind,ro toolwarden
if [ -n "${WRAP_DIR:-}" ]; then
  mkdir wrap; mount --bind "$WRAP_DIR" wrap; mount -o remount,bind,ro wrap
fi
mount --rbind "$SIM/pod" sim
# Image volumes are read-only mounts of images.
if [ -d sim/image-volumes ]; then
  mount --bind sim/image-volumes sim/image-volumes
  mount -o remount,bind,ro sim/image-volumes
fi
# A fresh procfs for the pod's pid namespace, masked as runc does for a container.
mount -t proc -o nosuid,nodev,noexec proc proc
for f in kcore keys latency_stats timer_list timer_stats sched_debug; do
  if [ -e "proc/$f" ]; then mount --bind /dev/null "proc/$f"; fi
done
for d in acpi asound scsi; do
  if [ -d "proc/$d" ]; then mount -t tmpfs -o ro tmpfs "proc/$d"; fi
done
for p in bus fs irq sys sysrq-trigger; do
  if [ -e "proc/$p" ]; then mount --bind "proc/$p" "proc/$p"; mount -o remount,bind,ro "proc/$p"; fi
done
# A fresh sysfs for the pod's network namespace, read-only from the start; /sys/firmware masked.
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs sys
if [ -d sys/firmware ]; then mount -t tmpfs -o ro tmpfs sys/firmware; fi
# The cgroup file system as a pod sees it: read-only.
if [ -e /sys/fs/cgroup/cgroup.controllers ]; then
  # cgroup v2: the runtime mounts cgroup2 in the container's own cgroup namespace, rooted at
  # its cgroup (the caller joined the pod's cgroup and then unshared --cgroup).
  mount -t cgroup2 -o ro,nosuid,nodev,noexec cgroup2 sys/fs/cgroup
else
  mount -t tmpfs -o mode=755 tmpfs sys/fs/cgroup
  for h in $(ls /sys/fs/cgroup); do
    if [ -d "/sys/fs/cgroup/$h" ] && ! [ -L "/sys/fs/cgroup/$h" ]; then
      mkdir "sys/fs/cgroup/$h"
      mount --bind "/sys/fs/cgroup/$h" "sys/fs/cgroup/$h"
      mount -o remount,bind,ro,nosuid,nodev,noexec "sys/fs/cgroup/$h"
    fi
  done
  mount -o remount,bind,ro,nosuid,nodev,noexec sys/fs/cgroup
fi
# /dev: a tmpfs with the standard devices bound from the host (no mknod in a user namespace).
mount -t tmpfs -o nosuid,mode=755,size=65536k tmpfs dev
for n in null zero full random urandom tty; do
  touch "dev/$n"; mount --bind "/dev/$n" "dev/$n"
done
mkdir dev/pts dev/shm
mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666,mode=0620 devpts dev/pts
ln -s pts/ptmx dev/ptmx
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs tmp
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs run
# readOnlyRootFilesystem: true
pivot_root . oldroot
cd /
umount -l /oldroot
rmdir /oldroot
mount -o remount,bind,ro /
# runAsUser 0 of the pod, allowPrivilegeEscalation: false, capabilities: drop ALL + $POD_CAPS.
exec /usr/bin/setpriv --no-new-privs --inh-caps=-all --ambient-caps=-all \
  --bounding-set="-all,$POD_CAPS" -- ${WRAP:-} "$@"
