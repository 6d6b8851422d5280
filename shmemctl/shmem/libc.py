"""Every mmap call shmemctl makes, through libc (Python's mmap module cannot take an address).

Three operations on address space, nothing more: reserve a range, map an fd
over part of it, put the reservation back. A range is never munmapped while
its reservation lives: an unrelated mmap(NULL) could land in the hole, and our
next MAP_FIXED would clobber it (docs/protocol.md §6.10).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

MAP_FAILED = ctypes.c_void_p(-1).value

_RESERVE_FLAGS = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
_SHARED_FIXED = MAP_SHARED | MAP_FIXED
_RESTORE_FLAGS = _RESERVE_FLAGS | MAP_FIXED


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.restype = ctypes.c_ssize_t
_process_vm_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_IOVec),
    ctypes.c_ulong,
    ctypes.POINTER(_IOVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def reserve(size: int) -> int:
    """Reserve `size` bytes of address space that nothing can touch; return its address."""
    addr = _mmap(None, size, PROT_NONE, _RESERVE_FLAGS, -1, 0)
    if addr == MAP_FAILED or addr is None:
        raise _fail(f"reserving {size:#x} bytes")
    return addr


def map_fd(addr: int, length: int, fd: int, offset: int, writable: bool) -> None:
    """Map `fd` at `offset` over [addr, addr+length) of a reservation, shared."""
    prot = PROT_READ | PROT_WRITE if writable else PROT_READ
    got = _mmap(addr, length, prot, _SHARED_FIXED, fd, offset)
    if got != addr:
        raise _fail(f"mapping fd {fd} at {addr:#x}+{length:#x}")


def restore(addr: int, length: int) -> None:
    """Put the PROT_NONE reservation back over [addr, addr+length): no hole, ever."""
    got = _mmap(addr, length, PROT_NONE, _RESTORE_FLAGS, -1, 0)
    if got != addr:
        raise _fail(f"restoring the reservation at {addr:#x}+{length:#x}")


def release(addr: int, size: int) -> None:
    """Give a whole reservation (and whatever is mapped in it) back to the kernel."""
    if _munmap(addr, size) != 0:
        raise _fail(f"releasing {addr:#x}+{size:#x}")


def read_memory(addr: int, length: int, pid: int | None = None) -> bytes:
    """Read memory (ours by default) without touching it directly and with its
    protections honoured: a reserved page or a page past the end of a truncated
    file gives EFAULT here instead of SIGSEGV/SIGBUS in the daemon."""
    buf = ctypes.create_string_buffer(length)
    local = _IOVec(ctypes.cast(buf, ctypes.c_void_p), length)
    remote = _IOVec(addr, length)
    n = _process_vm_readv(
        os.getpid() if pid is None else pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0
    )
    if n < 0:
        raise _fail(f"reading {addr:#x}+{length:#x}")
    return buf.raw[:n]
