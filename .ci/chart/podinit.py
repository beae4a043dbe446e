"""The container runtime of the kubelet emulation (.ci/chart/kubelet.py).

Started as root by `unshare --mount --propagation private`, so every mount
below is private to this one container and vanishes with it. It builds the
container's root filesystem as a read-only tmpfs holding only what the
image holds (the binary at its image path, the shared libraries it links,
an /etc with passwd, nsswitch.conf and the pod's hosts file), binds the
pod's volumes at their mountPaths (the data volume read-write, secrets
read-only), makes the root read-only, then chroots, takes the pod's user,
group and fsGroup, sets no_new_privs, and execs the binary: no shell and no
wrapper stays in between, so the server's pid is the one the emulation
signals.

Usage: podinit.py SPEC.json (written by kubelet.py).
"""

import ctypes
import json
import os
import subprocess
import sys

PR_SET_NO_NEW_PRIVS = 38


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    root = spec["root"]
    os.makedirs(root, exist_ok=True)
    mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", root)

    def bind(source: str, target: str, read_only: bool, recursive: bool = False) -> None:
        path = root + target
        if os.path.isdir(source):
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "a").close()
        mount("--rbind" if recursive else "--bind", source, path)
        if read_only:
            mount("-o", "remount,bind,ro", path)

    for link, target in spec["symlinks"].items():
        os.symlink(target, root + link)
    for directory in spec["lib_dirs"]:
        bind(directory, directory, True)
    # /proc and /sys read-only without their submounts (cgroup files among
    # them); /dev with its own (pts, shm, as a container's /dev has).
    bind("/proc", "/proc", True)
    bind("/sys", "/sys", True)
    bind("/dev", "/dev", False, recursive=True)
    bind(spec["binary"], spec["binary_path"], True)
    for name, text in spec["etc"].items():
        os.makedirs(root + "/etc", exist_ok=True)
        with open(f"{root}/etc/{name}", "w") as f:
            f.write(text)
    for m in spec["mounts"]:
        bind(m["source"], m["path"], m["read_only"])
    # readOnlyRootFilesystem: everything not mounted read-write is read-only.
    mount("-o", "remount,ro", root)

    os.chroot(root)
    os.chdir(spec.get("working_dir") or "/")
    os.setgroups(spec["groups"])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    if spec["no_new_privs"]:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


if __name__ == "__main__":
    main()
