/* Escape probe run inside sandboxes: performs one attempt and prints "ok" or the errno name. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <linux/netlink.h>
#include <unistd.h>

static int report(long rc) {
    if (rc >= 0) { printf("ok\n"); return 0; }
    const char *n = strerrorname_np(errno);
    printf("%s\n", n ? n : "unknown");
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *c = argv[1];
    if (!strcmp(c, "pdeathsig")) { int sig = -1; if (prctl(PR_GET_PDEATHSIG, &sig) < 0) return report(-1); printf("%d\n", sig); return 0; }
    if (!strcmp(c, "pdeathsig_clear")) return report(prctl(PR_SET_PDEATHSIG, 0));
    if (!strcmp(c, "bpf")) { char attr[128] = {0}; return report(syscall(SYS_bpf, 0, attr, sizeof attr)); }
    if (!strcmp(c, "io_uring")) { char p[120] = {0}; return report(syscall(SYS_io_uring_setup, 4, p)); }
    if (!strcmp(c, "keyctl")) return report(syscall(SYS_keyctl, 0 /*GET_KEYRING_ID*/, -3, 0));
    if (!strcmp(c, "add_key")) return report(syscall(SYS_add_key, "user", "x", "y", 1, -3));
    if (!strcmp(c, "ptrace")) return report(syscall(SYS_ptrace, 16 /*ATTACH*/, 1, 0, 0));
    if (!strcmp(c, "process_vm_readv")) return report(syscall(SYS_process_vm_readv, 1, 0, 0, 0, 0, 0));
    if (!strcmp(c, "perf_event_open")) { char a[128] = {0}; return report(syscall(SYS_perf_event_open, a, 0, -1, -1, 0)); }
    if (!strcmp(c, "userfaultfd")) return report(syscall(SYS_userfaultfd, 0));
    if (!strcmp(c, "open_by_handle_at")) { char h[136] = {0}; ((unsigned*)h)[0] = 8; return report(syscall(SYS_open_by_handle_at, AT_FDCWD, h, O_RDONLY)); }
    if (!strcmp(c, "clone3")) { char a[88] = {0}; return report(syscall(SYS_clone3, a, sizeof a)); }
    if (!strcmp(c, "clone_newuser")) { long r = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0); if (r == 0) _exit(0); return report(r); }
    if (!strcmp(c, "unshare")) return report(unshare(CLONE_NEWUSER));
    if (!strcmp(c, "setns")) { int fd = open("/proc/self/ns/net", O_RDONLY); return report(setns(fd, 0)); }
    if (!strcmp(c, "mount")) return report(mount("none", "/tmp", "tmpfs", 0, 0));
    if (!strcmp(c, "mount_cgroup")) return report(mount("cgroup", "/tmp", "cgroup", 0, "memory"));
    if (!strcmp(c, "chroot")) return report(chroot("/tmp"));
    if (!strcmp(c, "mknod")) return report(mknod("/tmp/mem", S_IFCHR | 0600, makedev(1, 1)));
    if (!strcmp(c, "netlink")) return report(socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE));
    if (!strcmp(c, "raw")) return report(socket(AF_INET, SOCK_RAW, IPPROTO_ICMP));
    if (!strcmp(c, "packet")) return report(socket(AF_PACKET, SOCK_RAW, 0));
    if (!strcmp(c, "vsock")) return report(socket(40 /*AF_VSOCK*/, SOCK_STREAM, 0));
    if (!strcmp(c, "tcp_connect") && argc > 2) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0) return report(s);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
        inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
        return report(connect(s, (struct sockaddr *)&a, sizeof a));
    }
    if (!strcmp(c, "abstract_connect") && argc > 2) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        strncpy(a.sun_path + 1, argv[2], sizeof a.sun_path - 2);
        return report(connect(s, (struct sockaddr *)&a, sizeof(sa_family_t) + 1 + strlen(argv[2])));
    }
    if (!strcmp(c, "lo_up")) {
        /* lo must be up: binding and connecting to 127.0.0.1 inside works. */
        int l = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET};
        inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
        if (bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 1) < 0) return report(-1);
        socklen_t n = sizeof a; getsockname(l, (struct sockaddr *)&a, &n);
        int s = socket(AF_INET, SOCK_STREAM, 0);
        return report(connect(s, (struct sockaddr *)&a, sizeof a));
    }
    return 2;
}
