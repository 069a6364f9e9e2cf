#!/usr/bin/env python3
"""Writes the sysfs fixture trees the topology tests parse (committed; rerun
to regenerate). Each tree mirrors the parts of /sys kvx reads:
  devices/system/node/nodeN/cpulist
  devices/pciDDDD:BB/<bdf>/.../<bdf>/{class,vendor,device,numa_node}
  bus/pci/devices/<bdf> -> ../../../devices/pci.../<bdf>      (relative symlinks)
  class/infiniband/<dev>/device -> ../../../devices/...       ports/1/{rate,link_layer,state}
  class/net/<if>/device -> ...                                speed
"""
import os
import pathlib
import shutil

HERE = pathlib.Path(__file__).resolve().parent


def write(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def link(at: pathlib.Path, target: pathlib.Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(os.path.relpath(target, at.parent))


class Tree:
    def __init__(self, name: str):
        self.root = HERE / name
        shutil.rmtree(self.root, ignore_errors=True)

    def node(self, n: int, cpus: str) -> None:
        write(self.root / f"devices/system/node/node{n}/cpulist", cpus)

    def pci(self, chain, cls: str, vendor: str, numa: int, device: str = "0x0000") -> pathlib.Path:
        """chain: [root complex, bdf, bdf, ...]; the last is the device."""
        d = self.root / "devices" / pathlib.Path(*chain)
        write(d / "class", cls)
        write(d / "vendor", vendor)
        write(d / "device", device)
        write(d / "numa_node", str(numa))
        link(self.root / "bus/pci/devices" / chain[-1], d)
        return d

    def rdma(self, name: str, dev: pathlib.Path, rate: str = "400 Gb/sec (4X NDR)", layer: str = "InfiniBand") -> None:
        base = self.root / "class/infiniband" / name
        link(base / "device", dev)
        write(base / "ports/1/rate", rate)
        write(base / "ports/1/link_layer", layer)
        write(base / "ports/1/state", "4: ACTIVE")

    def net(self, name: str, dev: pathlib.Path, speed: int) -> None:
        base = self.root / "class/net" / name
        link(base / "device", dev)
        write(base / "speed", str(speed))


BRIDGE, GPU, NIC, NVME = "0x060400", "0x030200", "0x020700", "0x010802"
NVIDIA, MELLANOX, INTEL = "0x10de", "0x15b3", "0x8086"


def two_socket_8gpu() -> None:
    """Two sockets; per socket two PCIe switches, each with 2 GPUs and 2 NICs (8 GPUs, 8 NICs)."""
    t = Tree("two_socket_8gpu")
    t.node(0, "0-47")
    t.node(1, "48-95")
    gpu = nic = 0
    for socket, rc in ((0, "pci0000:00"), (1, "pci0000:80")):
        bus = 0x00 if socket == 0 else 0x80
        for sw in range(2):
            port = f"0000:{bus:02x}:{sw + 1:02x}.0"
            upstream = f"0000:{bus + 0x10 * (sw + 1):02x}:00.0"
            t.pci([rc, port], BRIDGE, INTEL, socket)
            t.pci([rc, port, upstream], BRIDGE, "0x1000", socket)
            for slot in range(4):
                down = f"0000:{bus + 0x10 * (sw + 1) + 1:02x}:{slot:02x}.0"
                t.pci([rc, port, upstream, down], BRIDGE, "0x1000", socket)
                ep = f"0000:{bus + 0x10 * (sw + 1) + 2 + slot:02x}:00.0"
                if slot < 2:
                    t.pci([rc, port, upstream, down, ep], GPU, NVIDIA, socket, "0x2330")
                    gpu += 1
                else:
                    d = t.pci([rc, port, upstream, down, ep], NIC, MELLANOX, socket, "0x1021")
                    t.rdma(f"mlx5_{nic}", d)
                    t.net(f"ibp{nic}", d, 400000)
                    nic += 1
        t.pci([rc, f"0000:{bus:02x}:1f.0", f"0000:{bus + 0x0f:02x}:00.0"], NVME, INTEL, socket)
    # The management NIC: plain Ethernet, no RDMA, on socket 0's root complex.
    d = t.pci(["pci0000:00", "0000:00:1c.0", "0000:0e:00.0"], "0x020000", INTEL, 0)
    t.net("eno1", d, 25000)


def single_socket() -> None:
    """One socket, one GPU and one RoCE NIC behind the root complex, a virtio NIC without PCIe numa info."""
    t = Tree("single_socket")
    t.node(0, "0-15")
    t.pci(["pci0000:00", "0000:00:01.0"], BRIDGE, INTEL, -1)
    t.pci(["pci0000:00", "0000:00:01.0", "0000:01:00.0"], GPU, NVIDIA, -1, "0x2684")
    t.pci(["pci0000:00", "0000:00:02.0"], BRIDGE, INTEL, -1)
    d = t.pci(["pci0000:00", "0000:00:02.0", "0000:02:00.0"], "0x020000", MELLANOX, -1, "0x1017")
    t.rdma("mlx5_0", d, "100 Gb/sec (4X EDR)", "Ethernet")
    t.net("enp2s0", d, 100000)


if __name__ == "__main__":
    two_socket_8gpu()
    single_socket()
    print("fixtures written under", HERE)
