#!/bin/sh
# Runs the sandbox test binaries in each configuration #14 asks for, and prints one
# table of results (binary x configuration):
#
#   host        the host itself, as it is (cgroup v1 hybrid on our machines)
#   v2          a QEMU guest booted with a pure cgroup v2 kernel (cgroup_no_v1=all), the
#               mode real nodes run; our own init as PID 1, cgroup2 at /sys/fs/cgroup
#   v2-systemd  as v2 with systemd as PID 1; the tests run in a unit with Delegate=yes
#   v2-swap     as v2, with a 512 MiB swap device
#
# Everything comes from Debian's packages: the guest kernel (linux-image-amd64),
# a debootstrap minbase root file system, QEMU with TCG (KVM is not usable on our
# machines). The guest is built once and cached under target/vm/. The repository
# is shared into the guest over 9p at the same path, so the test binaries built
# on the host run there unchanged.
#
#   scripts/vm-test.sh                 build the test binaries, run every configuration
#   VM_CONFIGS="v2-swap" scripts/vm-test.sh
#
# A test that prints SKIPPED fails its binary in a guest (each guest has everything every
# sandbox test needs); on the host it is reported as "skipped" (sandbox_cgroup_v2 on v1).
# Exit status: 0 when every binary passed in every configuration.
set -eu
repo="$(cd "$(dirname "$0")/.." && pwd)"
vm="$repo/target/vm"
configs="${VM_CONFIGS:-host v2 v2-systemd v2-swap}"
binaries="${VM_TEST_BINARIES:-sandbox_basic sandbox_escape sandbox_degraded sandbox_leak sandbox_cgroup_v2 sandbox_in_pod}"
# Under TCG a guest runs about 20x slower than the host: generous, but bounded.
timeout_secs="${VM_TIMEOUT_SECS:-1500}"

need() {
    command -v "$1" >/dev/null || {
        echo "vm-test: $1 missing (apt-get install -y $2)" >&2
        exit 2
    }
}
need qemu-system-x86_64 qemu-system-x86
need debootstrap debootstrap
need busybox busybox-static
need cpio cpio
need depmod kmod

# The host's own Debian mirror, as apt is configured here.
mirror() {
    awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null ||
        true
}

build_guest() {
    [ -f "$vm/guest.ready" ] && return 0
    echo "--- vm-test: building the guest (once; cached in target/vm)"
    rm -rf "$vm/rootfs" "$vm/kernel" "$vm/initrd"
    mkdir -p "$vm"
    url=$(mirror)
    [ -n "$url" ] || {
        echo "vm-test: no Debian mirror in /etc/apt/sources.list.d/*.sources" >&2
        exit 2
    }
    debootstrap --variant=minbase \
        --include=systemd-sysv,kmod,util-linux,busybox-static,gcc,libc6-dev \
        bookworm "$vm/rootfs" "$url" >"$vm/debootstrap.log" 2>&1 || {
        tail -n 20 "$vm/debootstrap.log" >&2
        exit 2
    }
    # The kernel package linux-image-amd64 points at, unpacked (not installed).
    kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    (cd "$vm" && rm -f linux-image-*.deb && apt-get download "$kpkg" >/dev/null 2>&1)
    dpkg-deb -x "$vm"/linux-image-*.deb "$vm/kernel"
    kver=$(ls "$vm/kernel/lib/modules")
    mkdir -p "$vm/rootfs/lib/modules"
    cp -a "$vm/kernel/lib/modules/$kver" "$vm/rootfs/lib/modules/"
    depmod -b "$vm/rootfs" "$kver"
    build_initrd "$kver"
    # Guest-side helpers: /vm/boot for our own PID 1, /vm/run-tests for both inits.
    mkdir -p "$vm/rootfs/vm"
    echo toolwarden-vm >"$vm/rootfs/etc/hostname"
    touch "$vm/guest.ready"
}

# A busybox initramfs that loads virtio and 9p, mounts the root over 9p and
# hands over to the init named by `twinit=` on the kernel command line.
build_initrd() {
    kver=$1
    work="$vm/initrd"
    mkdir -p "$work/bin" "$work/lib/modules" "$work/proc" "$work/sys" "$work/dev" "$work/newroot"
    cp "$(command -v busybox)" "$work/bin/busybox"
    order=""
    add_module() {
        case " $order " in *" $1 "*) return ;; esac
        for dep in $(modinfo -b "$vm/rootfs" -k "$kver" -F depends "$1" | tr ',' ' '); do
            add_module "$dep"
        done
        cp "$(modinfo -b "$vm/rootfs" -k "$kver" -n "$1")" "$work/lib/modules/$1.ko"
        order="$order $1"
    }
    for m in virtio_pci 9pnet_virtio 9p; do add_module "$m"; done
    echo "$order" >"$work/modules"
    cat >"$work/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules); do insmod "/lib/modules/$m.ko"; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose root /newroot ||
    { echo "initrd: cannot mount the 9p root"; poweroff -f; }
init=$(sed -n 's/.*twinit=\([^ ]*\).*/\1/p' /proc/cmdline)
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot "${init:-/sbin/init}"
EOF
    chmod 755 "$work/init"
    (cd "$work" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >"$vm/initrd.img"
}

# The scripts inside the guest, rewritten every run (they are cheap).
write_guest_scripts() {
    # PID 1 without systemd: the minimum a container host mounts, cgroup2 with
    # every controller delegated to children, then the tests.
    cat >"$vm/rootfs/vm/boot" <<'EOF'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
hostname toolwarden-vm
ip link set lo up 2>/dev/null || busybox ip link set lo up
# cgroup v2's no-internal-process rule: PID 1 leaves the root for a leaf so the
# root can delegate every controller.
mkdir /sys/fs/cgroup/init.scope && echo 1 >/sys/fs/cgroup/init.scope/cgroup.procs
for c in $(cat /sys/fs/cgroup/cgroup.controllers); do
    echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control
done
/vm/run-tests "$(sed -n 's/.*twconfig=\([^ ]*\).*/\1/p' /proc/cmdline)"
sync
echo o >/proc/sysrq-trigger
sleep 10
EOF
    cat >"$vm/rootfs/vm/run-tests" <<EOF
#!/bin/sh
# Runs each test binary; writes one line per binary to the results file:
# NAME STATUS SECONDS PASSED FAILED (STATUS: ok, FAILED, or skipped on the host).
config=\$1
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
repo="$repo"
if [ "\$config" != host ]; then
    mount | grep -q " \$repo " || { mkdir -p "\$repo" && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 repo "\$repo"; }
    # A guest promised cgroup v2: tests for v2 only fail rather than skip elsewhere.
    export TOOLWARDEN_TEST_CGROUP=v2
    # Unix sockets cannot be bound on the 9p root, where systemd leaves /tmp (libcontainer's
    # notify.sock in a test's state folder); a node's /tmp and emptyDirs are local.
    [ "\$(stat -fc %T /tmp)" = tmpfs ] || mount -t tmpfs tmpfs /tmp
fi
results="\$repo/target/vm/results/\$config"
rm -rf "\$results" && mkdir -p "\$results"
if [ "\$config" = v2-swap ]; then
    modprobe virtio_blk && mkswap /dev/vda >/dev/null && swapon /dev/vda
    export TOOLWARDEN_TEST_EXPECT_SWAP=1
fi
{ echo "kernel: \$(uname -r)"; echo "pid 1: \$(cat /proc/1/comm)"; cat /proc/swaps;
  echo "cgroup: \$(stat -fc %T /sys/fs/cgroup) \$(grep '^0::' /proc/self/cgroup)";
  echo "controllers: \$(cat /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || ls /sys/fs/cgroup | tr '\n' ' ')"; } >"\$results/environment"
export TOOLWARDEN_REQUIRE_SANDBOX=1 RUST_BACKTRACE=1
cd "\$repo"
while read -r name path; do
    log="\$results/\$name.log"
    start=\$(date +%s)
    # --show-output keeps what passing tests printed, so a SKIPPED line is seen.
    if "\$path" --test-threads=1 --show-output >"\$log" 2>&1; then status=ok; else status=FAILED; fi
    if [ "\$status" = ok ] && grep -q '^SKIPPED' "\$log"; then
        if [ "\$config" = host ]; then
            status=skipped
        else
            status=FAILED
            echo "vm-test: a test printed SKIPPED in the guest, which has all they need" >>"\$log"
        fi
    fi
    counts=\$(sed -n 's/^test result: [A-Z]*[a-z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' "\$log" | tail -n 1)
    echo "\$name \$status \$((\$(date +%s) - start)) \${counts:-0 0}" >>"\$results/summary"
done <"\$repo/target/vm/binaries"
echo done >>"\$results/summary"
sync
EOF
    chmod 755 "$vm/rootfs/vm/boot" "$vm/rootfs/vm/run-tests"
    cat >"$vm/rootfs/etc/systemd/system/toolwarden-vm-test.service" <<'EOF'
[Unit]
Description=toolwarden sandbox tests (cgroup v2 under systemd)
After=basic.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
# The sandbox engine creates per-call cgroups below its own: systemd hands the
# unit's subtree over only with Delegate=yes.
Delegate=yes
ExecStart=/vm/run-tests v2-systemd
StandardOutput=journal+console
EOF
}

# The sandbox test binaries as `NAME PATH` lines, built by cargo on the host.
list_binaries() {
    cargo test --locked --no-run --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
wanted = sys.argv[1].split()
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
            and msg["target"]["kind"] == ["test"] and msg["target"]["name"] in wanted:
        print(msg["target"]["name"], msg["executable"])
' "$binaries" >"$vm/binaries"
    for b in $binaries; do
        grep -q "^$b " "$vm/binaries" || { echo "vm-test: no test binary $b" >&2; exit 2; }
    done
}

run_config() {
    config=$1
    rm -rf "$vm/results/$config"
    if [ "$config" = host ]; then
        echo "--- vm-test: host ($(host_cgroup))"
        "$vm/rootfs/vm/run-tests" host
    else
        run_guest "$config"
    fi
    if ! grep -q '^done$' "$vm/results/$config/summary" 2>/dev/null; then
        echo "vm-test: $config did not finish; last console lines:" >&2
        tail -n 30 "$vm/console-$config.log" >&2
        return 1
    fi
    cat "$vm/results/$config/environment"
    ! grep -q ' FAILED ' "$vm/results/$config/summary"
}

run_guest() {
    config=$1
    kver=$(ls "$vm/kernel/lib/modules")
    cmdline="console=ttyS0 panic=-1 quiet systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all twconfig=$config"
    case $config in
        v2-systemd) cmdline="$cmdline twinit=/lib/systemd/systemd systemd.unit=toolwarden-vm-test.service" ;;
        *) cmdline="$cmdline twinit=/vm/boot" ;;
    esac
    disk=""
    if [ "$config" = v2-swap ]; then
        rm -f "$vm/swap.img" && truncate -s 512M "$vm/swap.img"
        disk="-drive file=$vm/swap.img,if=virtio,format=raw"
    fi
    echo "--- vm-test: $config (console: target/vm/console-$config.log)"
    # shellcheck disable=SC2086
    timeout "$timeout_secs" qemu-system-x86_64 -accel tcg,thread=multi -smp 2 -m 3072 \
        -kernel "$vm/kernel/boot/vmlinuz-$kver" -initrd "$vm/initrd.img" -append "$cmdline" \
        -fsdev local,id=root,path="$vm/rootfs",security_model=passthrough \
        -device virtio-9p-pci,fsdev=root,mount_tag=root \
        -fsdev local,id=repo,path="$repo",security_model=passthrough \
        -device virtio-9p-pci,fsdev=repo,mount_tag=repo \
        $disk -nographic -no-reboot -serial file:"$vm/console-$config.log" -monitor none ||
        echo "vm-test: $config: qemu exited with $? (timeout after ${timeout_secs}s is 124)"
}

host_cgroup() {
    case $(stat -fc %T /sys/fs/cgroup) in
        cgroup2fs) echo "cgroup v2" ;;
        *) echo "cgroup v1" ;;
    esac
}

# One cell of the table: "ok 4/4 (46s)", "FAILED 1/7 (116s)", "skipped", "not run".
cell() {
    line=$(grep "^$1 " "$vm/results/$2/summary" 2>/dev/null) || {
        echo "not run"
        return
    }
    set -- $line
    case $2 in
        ok) echo "ok $4/$(($4 + $5)) ($3s)" ;;
        skipped) echo "skipped ($3s)" ;;
        *) echo "FAILED $5/$(($4 + $5)) ($3s)" ;;
    esac
}

# The results as a Markdown table (also in target/vm/results/table.md).
report() {
    {
        printf '| test binary |'
        for config in $configs; do
            case $config in
                host) printf ' host (%s) |' "$(host_cgroup)" ;;
                *) printf ' %s |' "$config" ;;
            esac
        done
        printf '\n| --- |'
        for config in $configs; do printf ' --- |'; done
        printf '\n'
        for b in $binaries; do
            printf '| %s |' "$b"
            for config in $configs; do printf ' %s |' "$(cell "$b" "$config")"; done
            printf '\n'
        done
    } >"$vm/results/table.md"
    cat "$vm/results/table.md"
}

started=$(date +%s)
build_guest
list_binaries
write_guest_scripts
failed=""
for config in $configs; do
    run_config "$config" || failed="$failed $config"
done
echo "--- vm-test: results (logs: target/vm/results/CONFIG/BINARY.log)"
report
# A binary passed when it is ok (or, on the host, skipped as not applying there); one that
# did not run, in a configuration that did not finish, counts as failed.
passed=0
failures=0
for config in $configs; do
    ok=$(grep -cE '^[^ ]+ (ok|skipped) ' "$vm/results/$config/summary" 2>/dev/null || true)
    passed=$((passed + ${ok:-0}))
    failures=$((failures + $(echo $binaries | wc -w) - ${ok:-0}))
done
if [ -n "$failed" ]; then
    echo "vm-test: FAILED in:$failed" >&2
fi
echo "vm-test: $passed passed, $failures failed in $(($(date +%s) - started))s"
[ -z "$failed" ]
