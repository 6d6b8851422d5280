"""What backend_sim stands in for (`--device NAME`): the vhost-user devices of QEMU 7.2,
each as its `vhost-user-*-pci` front-end device expects it, and the shapes of the SHMEM
devices in the field.

A preset is data: the virtio feature bits the device offers beside VERSION_1 and
PROTOCOL_FEATURES, how many queues GET_QUEUE_NUM reports, its config space (CONFIG is
offered only with one: QEMU 7.2 warns when a device type that keeps its config itself
is offered it), its shared memory regions, and the scenario that fits it. Options given
beside `--device` win over its values.

Config spaces are zeroed but for what a device of that type could not go without (a
vsock device's guest CID, a block device's block size); the sizes are those of the
virtio structures QEMU 7.2 reads (`GET_CONFIG` asks for exactly that many bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from shmemctl.backend import MAX_CONFIG_SIZE


@dataclass(frozen=True)
class Preset:
    name: str
    #: what it stands in for, in a line
    what: str
    #: QEMU 7.2's front-end device for it (`-device QDEV,chardev=...`), if it has one
    qdev: str | None
    queues: int
    #: b"": no config space, and CONFIG not offered
    config: bytes
    #: virtio device feature bits offered (VERSION_1 and PROTOCOL_FEATURES always are)
    features: int = 0
    regions: str = "0=8M"
    #: the scenario `scenario start` runs when none is named
    scenario: str = "blobs"
    #: more `-device` properties QEMU needs for it
    qdev_properties: tuple[str, ...] = field(default=())
    #: QEMU 7.2 realizes it only with KVM ("vhost initialization failed: requires kvm")
    needs_kvm: bool = False


def _bits(*bits: int) -> int:
    return sum(1 << b for b in bits)


#: struct virtio_blk_config as QEMU 7.2 knows it (60 bytes), with a 512-byte block size
_BLK_CONFIG = bytes(20) + struct.pack("<I", 512) + bytes(36)
#: struct virtio_vsock_config: the guest's CID (3: the first one not reserved)
_VSOCK_CONFIG = struct.pack("<Q", 3)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "generic",
            "any device: a zeroed config space of the largest size GET_CONFIG "
            "carries, one queue; what every QEMU 7.2 vhost-user device that can run "
            "without a guest accepts",
            None,
            1,
            bytes(MAX_CONFIG_SIZE),
        ),
        Preset("rng", "virtio-rng (vhost-device-rng)", "vhost-user-rng-pci", 1, b""),
        # VIRTIO_GPIO_F_IRQ; struct virtio_gpio_config: ngpio, padding, gpio_names_size
        Preset(
            "gpio",
            "virtio-gpio (vhost-device-gpio)",
            "vhost-user-gpio-pci",
            2,
            bytes(8),
            features=_bits(0),
        ),
        # the hiprio queue and one request queue; QEMU keeps the tag and the queue count
        # in its own config space. DAX: 2 MiB windows of a real file in the cache region
        Preset(
            "fs",
            "virtio-fs with a DAX cache (virtiofsd)",
            "vhost-user-fs-pci",
            2,
            b"",
            regions="0=1G",
            scenario="dax",
            qdev_properties=("tag=shmemctl",),
        ),
        # VIRTIO_I2C_F_ZERO_LENGTH_REQUEST
        Preset(
            "i2c", "virtio-i2c (vhost-device-i2c)", "vhost-user-i2c-pci", 1, b"", features=_bits(0)
        ),
        # rx and tx (QEMU keeps the event queue); VIRTIO_VSOCK_F_SEQPACKET
        Preset(
            "vsock",
            "virtio-vsock (vhost-device-vsock)",
            "vhost-user-vsock-pci",
            2,
            _VSOCK_CONFIG,
            features=_bits(1),
        ),
        # SEG_MAX, BLK_SIZE, FLUSH, TOPOLOGY: what qemu-storage-daemon offers, but MQ
        Preset(
            "blk",
            "virtio-blk (qemu-storage-daemon)",
            "vhost-user-blk-pci",
            1,
            _BLK_CONFIG,
            features=_bits(2, 6, 9, 10),
        ),
        # the event and status queues; struct virtio_input_config (136 bytes)
        Preset(
            "input",
            "virtio-input (vhost-user-input)",
            "vhost-user-input-pci",
            2,
            bytes(136),
            needs_kvm=True,
        ),
        # control, event and one request queue; QEMU keeps the config space itself
        Preset("scsi", "virtio-scsi (vhost-user-scsi)", "vhost-user-scsi-pci", 3, b""),
        # blob resources in the host-visible region (shmid 1) and a second window, the
        # two packed into one 256 MiB BAR; EDID and RESOURCE_BLOB; the control and cursor
        # queues; struct virtio_gpu_config (16 bytes)
        Preset(
            "gpu",
            "virtio-gpu with blob resources (many small maps and unmaps)",
            "vhost-user-gpu-pci",
            2,
            bytes(16),
            features=_bits(1, 3),
            regions="1=192M,2=64M",
            needs_kvm=True,
        ),
        # one 4 GiB region, as vhost-device-media declares; the command and event
        # queues; struct virtio_media_config (40 bytes). No QEMU 7.2 device for it.
        Preset("media", "virtio-media (vhost-device-media)", None, 2, bytes(40), regions="0=4G"),
    )
}

DEFAULT = "generic"
