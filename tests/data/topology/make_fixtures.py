#!/usr/bin/env python3
"""Writes the sysfs fixture trees the topology tests parse (committed; rerun
to regenerate). Each tree mirrors the parts of /sys kvx reads:
  devices/system/node/nodeN/cpulist
  devices/pciDDDD:BB/<bdf>/.../<bdf>/{class,vendor,device,numa_node}
  bus/pci/devices/<bdf> -> ../../../devices/pci.../<bdf>      (relative symlinks)
  class/infiniband/<dev>/device -> ../../../devices/...       ports/1/{rate,link_layer,state}
                                                              ports/1/gids/<i>, ports/1/gid_attrs/{types,ndevs}/<i>
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

    def rdma(self, name: str, dev: pathlib.Path, rate: str = "400 Gb/sec (4X NDR)", layer: str = "InfiniBand",
             gids=(), table: int = 4) -> None:
        """gids: (gid as sysfs prints it, type, netdev or "") per used index from 0; the
        rest of the table's `table` entries are unused: all-zero GID, no type or ndev
        (reading them fails on a real host)."""
        base = self.root / "class/infiniband" / name
        link(base / "device", dev)
        write(base / "ports/1/rate", rate)
        write(base / "ports/1/link_layer", layer)
        write(base / "ports/1/state", "4: ACTIVE")
        for i in range(table):
            if i < len(gids):
                gid, kind, ndev = gids[i]
                write(base / f"ports/1/gids/{i}", gid)
                write(base / f"ports/1/gid_attrs/types/{i}", kind)
                if ndev:
                    write(base / f"ports/1/gid_attrs/ndevs/{i}", ndev)
            else:
                write(base / f"ports/1/gids/{i}", ":".join(["0000"] * 8))

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
                    # InfiniBand: index 0 is the port GID (subnet prefix + port GUID).
                    port_gid = f"fe80:0000:0000:0000:0c42:a103:00{0x65 + nic:02x}:b1a0"
                    t.rdma(f"mlx5_{nic}", d, gids=[(port_gid, "IB/RoCE v1", "")], table=2)
                    t.net(f"ibp{nic}", d, 400000)
                    nic += 1
        t.pci([rc, f"0000:{bus:02x}:1f.0", f"0000:{bus + 0x0f:02x}:00.0"], NVME, INTEL, socket)
    # The management NIC: plain Ethernet, no RDMA, on socket 0's root complex.
    d = t.pci(["pci0000:00", "0000:00:1c.0", "0000:0e:00.0"], "0x020000", INTEL, 0)
    t.net("eno1", d, 25000)


def single_socket() -> None:
    """One socket, one GPU and one RoCE NIC behind the root complex, no NUMA information
    from firmware, and a loopback interface without a PCI device."""
    t = Tree("single_socket")
    t.node(0, "0-15")
    t.pci(["pci0000:00", "0000:00:01.0"], BRIDGE, INTEL, -1)
    t.pci(["pci0000:00", "0000:00:01.0", "0000:01:00.0"], GPU, NVIDIA, -1, "0x2684")
    t.pci(["pci0000:00", "0000:00:02.0"], BRIDGE, INTEL, -1)
    d = t.pci(["pci0000:00", "0000:00:02.0", "0000:02:00.0"], "0x020000", MELLANOX, -1, "0x1017")
    # A RoCE port's table as the kernel fills it: the link-local GID and the
    # IPv4-mapped one, each as RoCE v1 and v2 (what rxe shows too).
    link_local = "fe80:0000:0000:0000:0a1b:2cff:fe3d:4e5f"
    mapped = "0000:0000:0000:0000:0000:ffff:c0a8:0114"  # ::ffff:192.168.1.20
    t.rdma("mlx5_0", d, "100 Gb/sec (4X EDR)", "Ethernet",
           gids=[(link_local, "IB/RoCE v1", "enp2s0"), (link_local, "RoCE v2", "enp2s0"),
                 (mapped, "IB/RoCE v1", "enp2s0"), (mapped, "RoCE v2", "enp2s0")], table=8)
    t.net("enp2s0", d, 100000)
    write(t.root / "class/net/lo/speed", "")  # no device link: skipped


if __name__ == "__main__":
    two_socket_8gpu()
    single_socket()
    print("fixtures written under", HERE)
