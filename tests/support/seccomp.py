"""The shipped unit's system call sandbox, applied to a test's child process without systemd.

PID 1 of the development and CI machines is not systemd, so the unit's `SystemCallFilter=`,
`SystemCallErrorNumber=` and `MemoryDenyWriteExecute=` are rebuilt here with libseccomp (the
library systemd itself uses; on every Debian system, apt links it): the groups are expanded by
`systemd-analyze syscall-filter`, the lines merged as systemd merges them, socket() limited to
`RestrictAddressFamilies=`, and the filter is loaded in the child after it took the unit's user,
just before exec, as systemd does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import socket
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

# libseccomp's ABI (seccomp.h).
_ACT_ALLOW = 0x7FFF0000
_ACT_ERRNO = 0x00050000
_CMP_MASKED_EQ = 7
_NR_ERROR = -1
_SHM_EXEC = 0o100000
_ERRNO_NAMES = {name: number for number, name in errno.errorcode.items()}


# Run by the system's python3 as the unit's user, inside the file-system sandbox: load the
# filter `export` wrote (no_new_privs first, as systemd), set the umask, exec the command.
LAUNCHER = """
import ctypes, os, sys
program = open(sys.argv[1], "rb").read()
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
code = ctypes.create_string_buffer(program, len(program))
libc = ctypes.CDLL(None, use_errno=True)
filter_ = Program(len(program) // 8, ctypes.cast(code, ctypes.c_void_p))
if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(filter_), 0, 0):
    raise OSError(ctypes.get_errno(), "could not load the seccomp filter")
os.umask(int(sys.argv[2], 8))
os.execv(sys.argv[3], sys.argv[3:])
"""


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def expand(names: Iterable[str]) -> set[str]:
    """System call names of `names`, groups (`@…`) expanded recursively by systemd's own table."""
    found: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            found.add(name)
            continue
        listing = subprocess.run(
            ["systemd-analyze", "syscall-filter", "--no-pager", name],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        members = [line.split()[0] for line in listing.splitlines()[1:] if line.strip()]
        found |= expand(m for m in members if not m.startswith("#"))
    return found


def allowed_calls(filter_lines: list[str]) -> set[str]:
    """The allow-list the unit's `SystemCallFilter=` lines make, in systemd's way: the first line
    is an allow-list (plus `@default`, always allowed), and each later line adds to it, or with
    `~` takes from it."""
    assert filter_lines and not filter_lines[0].startswith("~"), "expected an allow-list unit"
    allowed = expand(["@default"])
    for line in filter_lines:
        names = line.removeprefix("~").split()
        if line.startswith("~"):
            allowed -= expand(names)
        else:
            allowed |= expand(names)
    return allowed


class UnitSandbox:
    """A seccomp filter built in the parent; `load` (a Popen `preexec_fn`) applies it."""

    @classmethod
    def of_unit(cls, directives: Mapping[str, list[str]], *, without: str = "") -> UnitSandbox:
        """The filter a unit's [Service] directives (name → values in order) describe; `without`:
        one `SystemCallFilter=` line left out (a stricter unit)."""
        assert directives["NoNewPrivileges"][-1] == "yes"  # seccomp_load sets it, as systemd
        return cls(
            [line for line in directives["SystemCallFilter"] if line != without],
            directives["SystemCallErrorNumber"][-1],
            directives["MemoryDenyWriteExecute"][-1] == "yes",
            directives["RestrictAddressFamilies"][-1].split(),
        )

    def __init__(
        self,
        filter_lines: list[str],
        error_name: str,
        deny_write_execute: bool,
        address_families: list[str] | None = None,
    ) -> None:
        path = ctypes.util.find_library("seccomp")
        assert path, "libseccomp is missing (Debian: libseccomp2)"
        self._lib = ctypes.CDLL(path, use_errno=True)
        self._lib.seccomp_init.restype = ctypes.c_void_p
        self._lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self._lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        ]
        self._lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self._lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self._lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        denied_errno = _ERRNO_NAMES[error_name]
        self._ctx = self._lib.seccomp_init(_ACT_ERRNO | denied_errno)
        assert self._ctx, "seccomp_init failed"
        guarded = self._write_execute_guards() if deny_write_execute else {}
        if address_families is not None:
            families = [int(getattr(socket, name)) for name in address_families]
            guarded["socket"] = [(0, 0xFFFFFFFF, families)]
        for name in sorted(allowed_calls(filter_lines)):
            number = self._lib.seccomp_syscall_resolve_name(name.encode())
            if number == _NR_ERROR:
                continue  # another architecture's call (chown32 …)
            for prot_index, mask, values in guarded.get(name, [(0, 0, [0])]):
                for value in values:
                    self._allow(number, prot_index, mask, value)

    @staticmethod
    def _write_execute_guards() -> dict[str, list[tuple[int, int, list[int]]]]:
        """MemoryDenyWriteExecute=: (argument, mask, allowed values) per call; systemd refuses a
        mapping both writable and executable, and making memory executable afterwards."""
        w, x = mmap.PROT_WRITE, mmap.PROT_EXEC
        return {
            "mmap": [(2, w | x, [0, w, x])],
            "mprotect": [(2, x, [0])],
            "pkey_mprotect": [(2, x, [0])],
            "shmat": [(2, _SHM_EXEC, [0])],
        }

    def _allow(self, number: int, arg: int, mask: int, value: int) -> None:
        if mask:
            comparisons = (_ArgCmp * 1)(_ArgCmp(arg, _CMP_MASKED_EQ, mask, value))
            result = self._lib.seccomp_rule_add_array(self._ctx, _ACT_ALLOW, number, 1, comparisons)
        else:
            result = self._lib.seccomp_rule_add_array(self._ctx, _ACT_ALLOW, number, 0, None)
        assert result == 0, f"seccomp_rule_add({number}) failed: {result}"

    def export(self, path: Path) -> None:
        """The filter as a BPF program (what `LAUNCHER` loads)."""
        with path.open("wb") as out:
            assert self._lib.seccomp_export_bpf(self._ctx, out.fileno()) == 0
        path.chmod(0o644)

    def launcher(self, program: Path, umask: int, command: list[str]) -> list[str]:
        """`command` started under the filter exported to `program`, with `umask`."""
        return ["/usr/bin/python3", "-I", "-c", LAUNCHER, str(program), f"{umask:o}", *command]

    def load(self) -> None:
        """Sets no_new_privs and the filter on the calling process (and what it execs)."""
        if self._lib.seccomp_load(self._ctx) != 0:
            raise OSError(ctypes.get_errno(), "seccomp_load failed")
