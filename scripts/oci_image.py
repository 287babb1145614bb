#!/usr/bin/env python3
"""Assembles and verifies the toolwarden OCI image archive (no Docker engine needed).

build:  oci_image.py --binary PATH --ref REF --version V --revision SHA --created EPOCH --out OUT.tar
tool:   oci_image.py --busybox PATH --ref REF --version V --revision SHA --created EPOCH --out OUT.tar
verify: oci_image.py --verify OUT.tar

The tool image (--busybox) is a static busybox with its applets and the empty proc/, dev/, tmp/
a sandbox mounts over: a tool root file system that can be mounted as a Kubernetes image volume
(the e2e tests' TOOLWARDEN_E2E_TOOL_IMAGE).

The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...) in one tar,
the form `ctr images import` and `skopeo copy oci-archive:` read. Every tar is written with
sorted entries, uid/gid 0 and one timestamp, and gzip without a name or time, so the same
binary and commit give the same digests.
"""
import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

USER = 65532
BINARY_PATH = "usr/local/bin/toolwarden"
PASSWD = "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
GROUP = "root:x:0:\nnonroot:x:65532:\n"


def add(tar, name, data=None, mode=0o644, kind=tarfile.REGTYPE, mtime=0):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def rootfs_layer(binary, mtime):
    """The one layer: the binary, users and the folders a read-only root needs as mount points."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = {
            "etc/": (None, 0o755, tarfile.DIRTYPE),
            "etc/group": (GROUP.encode(), 0o644, tarfile.REGTYPE),
            "etc/passwd": (PASSWD.encode(), 0o644, tarfile.REGTYPE),
            "home/": (None, 0o755, tarfile.DIRTYPE),
            "run/": (None, 0o755, tarfile.DIRTYPE),
            "tmp/": (None, 0o1777, tarfile.DIRTYPE),
            "usr/": (None, 0o755, tarfile.DIRTYPE),
            "usr/local/": (None, 0o755, tarfile.DIRTYPE),
            "usr/local/bin/": (None, 0o755, tarfile.DIRTYPE),
            BINARY_PATH: (binary, 0o755, tarfile.REGTYPE),
        }
        # The egress proxy's upstream TLS trusts the system roots (as the Dockerfile copies them).
        if os.path.exists(CA_BUNDLE):
            with open(CA_BUNDLE, "rb") as f:
                entries.update({
                    "etc/ssl/": (None, 0o755, tarfile.DIRTYPE),
                    "etc/ssl/certs/": (None, 0o755, tarfile.DIRTYPE),
                    CA_BUNDLE.lstrip("/"): (f.read(), 0o644, tarfile.REGTYPE),
                })
        for name in sorted(entries):
            data, mode, kind = entries[name]
            add(tar, name.rstrip("/"), data, mode, kind, mtime)
    return buf.getvalue()


def busybox_layer(busybox, applets, mtime):
    """A tool root file system: /bin/busybox, its applets as symlinks, the sandbox's mount points."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d, mode in (("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("proc", 0o555),
                        ("sys", 0o555), ("tmp", 0o1777)):
            add(tar, d, mode=mode, kind=tarfile.DIRTYPE, mtime=mtime)
        add(tar, "bin/busybox", busybox, 0o755, mtime=mtime)
        for applet in sorted(set(applets) - {"busybox"}):
            info = tarfile.TarInfo("bin/" + applet)
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, "busybox", 0o777, mtime
            tar.addfile(info)
        add(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n", mtime=mtime)
        add(tar, "etc/passwd", b"root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n", mtime=mtime)
    return buf.getvalue()


def gzip_bytes(data):
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)
    return out.getvalue()


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build(args):
    with open(args.binary or args.busybox, "rb") as f:
        binary = f.read()
    created_iso = datetime.datetime.fromtimestamp(
        int(args.created), datetime.timezone.utc
    ).strftime("%Y-%m-%dT%H:%M:%SZ")
    if args.busybox:
        applets = args.applets.split()
        layer_tar = busybox_layer(binary, applets, int(args.created))
    else:
        layer_tar = rootfs_layer(binary, int(args.created))
    layer = gzip_bytes(layer_tar)
    labels = {
        "org.opencontainers.image.title": "toolwarden",
        "org.opencontainers.image.description": "Kubernetes operator that makes the tools AI agents call safe to run in production",
        "org.opencontainers.image.version": args.version,
        "org.opencontainers.image.revision": args.revision,
        "org.opencontainers.image.created": created_iso,
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    config = canonical({
        "architecture": "amd64",
        "os": "linux",
        "created": created_iso,
        "config": {
            "User": "65534:65534",
            "Entrypoint": ["/bin/sh"],
            "Env": ["PATH=/bin"],
            "WorkingDir": "/",
            "Labels": labels,
        } if args.busybox else {
            "User": f"{USER}:{USER}",
            "Entrypoint": ["/" + BINARY_PATH],
            "Cmd": ["--help"],
            "Env": ["PATH=/usr/local/bin"],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [digest(layer_tar)]},
        "history": [{"created": created_iso, "created_by": "scripts/build-image.sh"}],
    })
    manifest = canonical({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest(layer), "size": len(layer)}],
        "annotations": labels,
    })
    index = canonical({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(manifest), "size": len(manifest),
            "platform": {"architecture": "amd64", "os": "linux"},
            # containerd's importer names the image after io.containerd.image.name;
            # other tools read the OCI ref name.
            "annotations": {"io.containerd.image.name": args.ref,
                            "org.opencontainers.image.ref.name": args.ref},
        }],
    })
    files = {"oci-layout": canonical({"imageLayoutVersion": "1.0.0"}), "index.json": index}
    for blob in (config, manifest, layer):
        files["blobs/sha256/" + digest(blob).split(":")[1]] = blob
    with tarfile.open(args.out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            add(tar, d, mode=0o755, kind=tarfile.DIRTYPE, mtime=int(args.created))
        for name in sorted(files):
            add(tar, name, files[name], mtime=int(args.created))
    print(f"wrote {args.out}: {args.ref}")
    print(f"  manifest {digest(manifest)}")
    print(f"  binary {len(binary)} bytes, layer {len(layer)} bytes gzipped, "
          f"archive {sum(len(b) for b in files.values())} bytes of blobs")


def verify(path):
    """Checks every digest and size in the archive and the image's run settings."""
    with tarfile.open(path) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}

    def blob(desc):
        data = files.get("blobs/sha256/" + desc["digest"].split(":")[1])
        if data is None or digest(data) != desc["digest"] or len(data) != desc["size"]:
            sys.exit(f"{path}: blob {desc['digest']} missing or does not match its descriptor")
        return data

    if json.loads(files["oci-layout"])["imageLayoutVersion"] != "1.0.0":
        sys.exit(f"{path}: not an OCI image layout")
    (entry,) = json.loads(files["index.json"])["manifests"]
    manifest = json.loads(blob(entry))
    config = json.loads(blob(manifest["config"]))
    (layer_desc,) = manifest["layers"]
    layer_tar = gzip.decompress(blob(layer_desc))
    if config["rootfs"]["diff_ids"] != [digest(layer_tar)]:
        sys.exit(f"{path}: layer diff_id does not match the config")
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as layer:
        members = {m.name: m for m in layer.getmembers()}
    tool = "bin/busybox" in members
    main_path, user = ("bin/busybox", "65534:65534") if tool else (BINARY_PATH, f"{USER}:{USER}")
    binary = members.get(main_path)
    if binary is None or not binary.mode & 0o111:
        sys.exit(f"{path}: /{main_path} missing or not executable")
    if tool and not all(members.get(d, tarfile.TarInfo()).isdir() for d in ("proc", "dev", "tmp")):
        sys.exit(f"{path}: a tool image needs the empty directories /proc, /dev and /tmp")
    if any(m.mode & 0o6000 for m in members.values()):
        sys.exit(f"{path}: set-id file in the image")
    if config["config"]["User"] != user:
        sys.exit(f"{path}: image user is {config['config']['User']}, expected {user}")
    print(f"{path}: ok ({entry['annotations']['io.containerd.image.name']}, "
          f"{len(members)} entries, binary {binary.size} bytes)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verify", metavar="ARCHIVE")
    for flag in ("--binary", "--busybox", "--ref", "--version", "--revision", "--created", "--out"):
        parser.add_argument(flag)
    parser.add_argument("--applets", default="sh", help="busybox applets to link (with --busybox)")
    args = parser.parse_args()
    if args.verify:
        verify(args.verify)
        return
    required = ("ref", "version", "revision", "created", "out")
    missing = [f for f in required if getattr(args, f) is None]
    if (args.binary is None) == (args.busybox is None):
        missing.append("binary or busybox (one of them)")
    if missing:
        parser.error("missing " + ", ".join("--" + m for m in missing))
    build(args)
    verify(args.out)


if __name__ == "__main__":
    main()
